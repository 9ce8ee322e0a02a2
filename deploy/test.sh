#!/usr/bin/env bash
# One command that installs what is missing, builds, and runs every test tier
# (unit, netns, e2e). Real-kernel tiers need root; with
# PORTFLEET_REQUIRE_PRIVILEGED=1 a privileged test that cannot run fails
# instead of skipping.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${PORTFLEET_BUILD_DIR:-$root/build}"
"$root/deploy/install-deps.sh"
"$root/deploy/build.sh" "$@"
cd "$build"
# install-deps.sh has just installed python3-grpcio and python3-grpc-tools:
# a test that needs them must not skip here.
export PORTFLEET_REQUIRE_PYTHON_DEPS="${PORTFLEET_REQUIRE_PYTHON_DEPS:-1}"
# The deploy tier (podman) runs by its own command: deploy/deploy-test.sh.
ctest --output-on-failure --timeout 300 -j2 -LE deploy
