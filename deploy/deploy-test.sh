#!/usr/bin/env bash
# The deploy tier: the DaemonSet's pod under podman kube play (see
# tests/deploy/kube_play_surge_test.py). Installs podman & co. if missing,
# builds (deploy/build.sh) with the tier enabled and runs ctest -L deploy.
# Also tests/deploy/kube_play_configmap_test.py (declarative mode) and
# tests/deploy/systemd_pid1_test.py (the unit under systemd as PID 1). About
# 2 min once the Debian base images are cached, 5 min before.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh --deploy
bash deploy/build.sh -DPORTFLEET_DEPLOY_TESTS=ON
cd "${PORTFLEET_BUILD_DIR:-build}"
ctest -L deploy --output-on-failure
