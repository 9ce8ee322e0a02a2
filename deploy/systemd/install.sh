#!/usr/bin/env bash
# Installs portfleet as a systemd service from an existing build:
#   build/agent/portfleet-agent, build/worker/portfleet-worker,
#   build/ctl/portfleetctl      -> $PREFIX/bin (default /usr/local/bin)
#   portfleet-agent.service     -> /etc/systemd/system/
#   deploy/examples/quickstart.textproto -> /etc/portfleet/fleet.textproto,
#                                  only if no fleet.textproto is there yet
#
#   deploy/build.sh && sudo deploy/systemd/install.sh [--now] [--spec FILE]
#
# Idempotent: files that are already identical are left alone, an existing
# /etc/portfleet/fleet.textproto is never overwritten. Nothing is started or
# restarted unless --now is given; then the unit is enabled and started (a
# running agent is not restarted: the script prints how to switch it over
# without refusing connections, see deploy/README.md).
#
# Environment: PORTFLEET_BUILD_DIR (default ./build), DESTDIR (stage into a
# directory instead of /, for packaging and tests; implies no systemctl).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${PORTFLEET_BUILD_DIR:-$root/build}"
destdir="${DESTDIR:-}"
prefix="${PREFIX:-/usr/local}"
now=0
spec="$root/deploy/examples/quickstart.textproto"

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}
while (($# > 0)); do
  case "$1" in
    --now) now=1 ;;
    --spec) shift; (($# > 0)) || usage 2; spec="$1" ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
  shift
done

binaries=(agent/portfleet-agent worker/portfleet-worker ctl/portfleetctl)
for b in "${binaries[@]}"; do
  if [[ ! -x "$build/$b" ]]; then
    echo "install.sh: $build/$b is missing: run deploy/build.sh first" >&2
    exit 1
  fi
done
if [[ -z "$destdir" && $(id -u) -ne 0 ]]; then
  echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi

# The unit names /usr/local/bin; a different PREFIX gets a rewritten copy.
unit_src="$root/deploy/systemd/portfleet-agent.service"
unit_tmp="$(mktemp)"
trap 'rm -f "$unit_tmp"' EXIT
sed -e "s#/usr/local/bin/#$prefix/bin/#g" \
    -e "s#/usr/local/share/doc/#$prefix/share/doc/#g" "$unit_src" >"$unit_tmp"

changed_unit=0
# install_file MODE SRC DST: copies only when the content differs.
install_file() {
  local mode="$1" src="$2" dst="$3"
  if [[ -f "$dst" ]] && cmp -s "$src" "$dst"; then
    echo "  unchanged $dst"
    return 1
  fi
  install -D -m "$mode" "$src" "$dst"
  echo "  installed $dst"
}

echo "install.sh: installing into ${destdir:-/}" >&2
for b in "${binaries[@]}"; do
  install_file 0755 "$build/$b" "$destdir$prefix/bin/$(basename "$b")" || true
done
if [[ -f "$root/deploy/README.md" ]]; then
  install_file 0644 "$root/deploy/README.md" \
    "$destdir$prefix/share/doc/portfleet/README.md" || true
fi
if install_file 0644 "$unit_tmp" "$destdir/etc/systemd/system/portfleet-agent.service"; then
  changed_unit=1
fi
install -d -m 0755 "$destdir/etc/portfleet"
if [[ -e "$destdir/etc/portfleet/fleet.textproto" ]]; then
  echo "  kept      $destdir/etc/portfleet/fleet.textproto (exists)"
else
  if ! "$build/agent/portfleet-agent" --check --config "$spec" >/dev/null; then
    echo "install.sh: $spec is not a valid fleet spec" >&2
    exit 1
  fi
  install -m 0644 "$spec" "$destdir/etc/portfleet/fleet.textproto"
  echo "  installed $destdir/etc/portfleet/fleet.textproto (from $spec)"
fi

if [[ -n "$destdir" ]]; then
  ((now == 0)) || echo "install.sh: --now ignored with DESTDIR" >&2
  exit 0
fi
if ! command -v systemctl >/dev/null || [[ ! -d /run/systemd/system ]]; then
  echo "install.sh: systemd is not running here; files installed, nothing started" >&2
  exit 0
fi
if ((changed_unit)); then systemctl daemon-reload; fi
if ((now)); then
  systemctl enable portfleet-agent.service
  if systemctl is-active --quiet portfleet-agent.service; then
    # The running agent decides what a restart does: one with step-aside
    # leaves its workers to the new agent, an older one drains them and
    # refuses connections until the new agent serves. Leave the choice to
    # the operator.
    cat >&2 <<'MSG'
install.sh: portfleet-agent is running the previous binaries; not restarted.
  Without a refused connection (workers are re-adopted, deploy/README.md):
    systemctl restart portfleet-agent
  unless the running agent predates step-aside (its --help lists no SIGUSR2):
  a restart drains that one; switch it over with
    systemctl kill --kill-whom=main --signal=SIGKILL portfleet-agent
  Then, for the new worker binary: portfleetctl rollout LISTENER
MSG
  else
    systemctl start portfleet-agent.service
  fi
  systemctl --no-pager status portfleet-agent.service || true
else
  echo "install.sh: done; start with: systemctl enable --now portfleet-agent" >&2
fi
