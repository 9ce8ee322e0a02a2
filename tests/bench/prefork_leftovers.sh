#!/usr/bin/env bash
# Before/after check for issue 15 (not a ctest test): a plain pre-fork worker
# (tests/workers/prefork_worker.py; the parent exits at once on SIGTERM, its
# two children keep serving 30 s), two shards, drain timeout 2 s, in a private
# network namespace. Prints how many of 20 new connections the old version
# answers 4 s after `rollout` returned, how many children of a SIGKILLed
# worker parent still run 4 s later, and how many processes are left after
# the agent's SIGTERM (exit status shown).
#   tests/bench/prefork_leftovers.sh BUILD_DIR
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR}" && pwd)
src=$(cd "$(dirname "$0")/../.." && pwd)
if [[ "${PF_IN_NETNS:-}" != 1 ]]; then
  exec unshare --net env PF_IN_NETNS=1 "$0" "$build"
fi
ip link set lo up
dir=$(mktemp -d)
bpffs="/sys/fs/bpf/pf-leftovers-$$"
trap 'pkill -KILL -f "prefork_worker.py --tag=$$" 2>/dev/null || true; [[ -n "${PF_KEEP:-}" ]] && cp "$dir/agent.log" "$PF_KEEP"; rm -rf "$dir" "$bpffs"' EXIT
worker_args() {
  printf 'args: "%s" ' "$src/tests/workers/prefork_worker.py" "--tag=$$" \
    --children=2 --parent-on-term=exit --child-on-term=linger --linger=30 \
    "--version=$1"
}
cat >"$dir/fleet.textproto" <<SPEC
listeners {
  name: "web" address: "127.0.0.1:8080" shards: 2
  worker { command: "/usr/bin/python3" $(worker_args 1) }
  drain_timeout_seconds: 2
  steering { policy: STEERING_POLICY_HASH }
}
SPEC
"$build/agent/portfleet-agent" --config "$dir/fleet.textproto" \
  --api "unix://$dir/api.sock" --state-dir "$dir/state" --bpffs "$bpffs" \
  --metrics 127.0.0.1:0 >"$dir/agent.log" 2>&1 &
agent=$!
for _ in $(seq 100); do curl -fs -o /dev/null http://127.0.0.1:8080/ && break; sleep 0.1; done
sleep 2.5  # ready (no control channel: 2 s grace)
old=$( (pgrep -f "prefork_worker.py --tag=$$ .*--version=1" || true) | sort)
echo "old version: $(echo $old | wc -w) processes"
"$build/ctl/portfleetctl" --server "unix://$dir/api.sock" rollout web \
  --worker-args "$src/tests/workers/prefork_worker.py --tag=$$ --children=2 --parent-on-term=exit --child-on-term=linger --linger=30 --version=2" >/dev/null
sleep 4
old_answers=0
for _ in $(seq 20); do
  pid=$(curl -s --max-time 3 http://127.0.0.1:8080/ | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
  if grep -qx "$pid" <<<"$old"; then old_answers=$((old_answers + 1)); fi
done
echo "after rollout (+4 s): $old_answers of 20 new connections answered by the old version"
parent=$(pgrep -P "$agent" -f "prefork_worker.py --tag=$$ .*--version=2" | head -1 || true)
children=$(pgrep -P "$parent" | sort || true)
kill -KILL "$parent"
sleep 4
alive=0
for c in $children; do kill -0 "$c" 2>/dev/null && alive=$((alive + 1)); done
echo "SIGKILL of a worker's parent (+4 s): $alive of its $(echo $children | wc -w) children still running"
kill -TERM "$agent"
rc=0
wait "$agent" || rc=$?
sleep 0.5
left=$( (pgrep -f "prefork_worker.py --tag=$$" || true) | wc -l)
echo "after agent SIGTERM (exit $rc): $left worker processes left"
