#!/usr/bin/env bash
# Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/)
# from the repository's examples and protos. Run it after changing a proto;
# the seeds are committed. Needs protoc.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/tests/fuzz/corpus"
mkdir -p "$out"/{spec_fuzz,state_fuzz,authz_fuzz,control_fuzz,takeover_fuzz}
cp "$root"/deploy/examples/*.textproto "$root"/deploy/examples/*.json \
  "$out/spec_fuzz/"
rm -f "$out/spec_fuzz/api-authz-policy.json"
cp "$root/deploy/examples/api-authz-policy.json" "$out/authz_fuzz/"
{
  echo "# portfleet fleet state (portfleet.v1.FleetSpec); written by the agent, do not edit"
  cat "$root/deploy/examples/quickstart.textproto"
  echo "# end of portfleet state"
} >"$out/state_fuzz/quickstart.textproto"

encode() {  # encode MESSAGE TEXT -> binary on stdout
  printf '%s' "$2" | protoc --encode="portfleet.v1.$1" -I "$root/proto" \
    "$root/proto/portfleet/v1/control.proto"
}
frame2() {  # [len hi, len lo, bytes]
  local n; n=$(wc -c <"$1")
  printf "\\x$(printf %02x $((n >> 8)))\\x$(printf %02x $((n & 255)))"
  cat "$1"
}
frame3() {  # [flags, len hi, len lo, bytes]
  local n; n=$(wc -c <"$2")
  printf "\\x$(printf %02x "$1")\\x$(printf %02x $((n >> 8)))\\x$(printf %02x $((n & 255)))"
  cat "$2"
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
encode WorkerMessage 'hello { pid: 1000 listener: "fuzz" shard: 0 version: "0.1.0" socket_inode: 7 }' >"$tmp/hello"
encode WorkerMessage 'ready {}' >"$tmp/ready"
encode WorkerMessage 'load { active_connections: 3 accepted_total: 9 bytes_in_total: 100 bytes_out_total: 200 }' >"$tmp/load"
encode WorkerMessage 'drained {}' >"$tmp/drained"
encode WorkerMessage 'takeover_request { pid: 1 version: "x" }' >"$tmp/treq"
{ frame2 "$tmp/hello"; frame2 "$tmp/ready"; frame2 "$tmp/load"; } >"$out/control_fuzz/hello-ready-load"
{ frame2 "$tmp/drained"; frame2 "$tmp/treq"; } >"$out/control_fuzz/drained-takeover"
encode AgentMessage 'takeover_shard { listener { name: "web" address: "127.0.0.1:8080" shards: 2 worker { command: "portfleet-worker" } } shard: 0 }' >"$tmp/s0"
encode AgentMessage 'takeover_shard { listener { name: "web" address: "127.0.0.1:8080" shards: 2 worker { command: "portfleet-worker" } } shard: 1 }' >"$tmp/s1"
encode AgentMessage 'takeover_end { shards: 2 }' >"$tmp/end"
{ frame3 1 "$tmp/s0"; frame3 1 "$tmp/s1"; frame3 0 "$tmp/end"; } >"$out/takeover_fuzz/two-shards"
{ frame3 0 "$tmp/s0"; frame3 0 "$tmp/end"; } >"$out/takeover_fuzz/shard-without-socket"
echo "seeds written to $out"
