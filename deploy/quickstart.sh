#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a running fleet:
# installs what is missing, builds, and runs the agent in the foreground with
# deploy/examples/quickstart.textproto. Ctrl-C stops it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/deploy/install-deps.sh"
"$root/deploy/build.sh"
exec "$root/build/agent/portfleet-agent" \
  --config "${PORTFLEET_CONFIG:-$root/deploy/examples/quickstart.textproto}" "$@"
