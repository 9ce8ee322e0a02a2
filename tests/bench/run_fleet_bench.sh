#!/bin/sh
# Runs portfleet-fleet-bench: the agent (2 shards, HASH and CPU) vs nginx
# (reuseport, and one shared listener), in a private network namespace.
# Installs nginx-light (or nginx), wrk and gnuplot-nox with apt-get if they
# are missing. Benchmarks are not run by CI. Run as root:
#
#   tests/bench/run_fleet_bench.sh [BUILD_DIR] [-- extra bench flags]
#
# BUILD_DIR defaults to build-bench next to this repository's top level; the
# Markdown goes to stdout, the latency plot to BUILD_DIR/fleet-bench-latency.png.
set -eu

here=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$here/build-bench}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift

if [ "$(id -u)" -ne 0 ]; then
  echo "run_fleet_bench.sh: needs root (network namespace, BPF, apt-get)" >&2
  exit 2
fi

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq >&2
    apt_updated=1
  fi
  # Keep the package from starting a system nginx on :80: the bench runs its
  # own instances in its namespace (policy-rc.d exit 101 = "not allowed").
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "$@" >&2 || rc=$?
  [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
  return $rc
}

nginx=$(command -v nginx || true)
[ -z "$nginx" ] && [ -x /usr/sbin/nginx ] && nginx=/usr/sbin/nginx
if [ -z "$nginx" ]; then
  apt_install nginx-light || apt_install nginx
  nginx=/usr/sbin/nginx
fi
command -v gnuplot >/dev/null 2>&1 || apt_install gnuplot-nox || true
command -v wrk >/dev/null 2>&1 || apt_install wrk || true

if [ ! -x "$build/tests/portfleet-fleet-bench" ]; then
  cmake -S "$here" -B "$build" >&2
  make -C "$build" -j2 portfleet-agent portfleet-worker portfleet-fleet-bench \
    portfleet-agent-bench >&2
fi

build=$(cd "$build" && pwd)  # absolute: the bench runs from inside it
cd "$build"
exec "$build/tests/portfleet-fleet-bench" --nginx="$nginx" \
  --png="$build/fleet-bench-latency.png" "$@"
