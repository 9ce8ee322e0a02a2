#!/usr/bin/env bash
# Installs the Debian 12 (bookworm) packages portfleet needs to build, run and
# test (deploy/install-deps.sh --deploy adds the container engine for the
# deploy tier). Idempotent: quiet and quick when everything is present.
set -euo pipefail

PACKAGES=(
  # build
  cmake g++ make pkg-config
  # gRPC, protobuf, abseil
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libabsl-dev
  # eBPF steering: clang compiles the program, bpftool makes the skeleton
  clang llvm libbpf-dev bpftool linux-libc-dev
  # sd-bus: the agent asks systemd whether a SIGTERM is a restart
  libsystemd-dev
  # fuzzing: the libFuzzer runtime (deploy/fuzz.sh)
  libclang-rt-14-dev
  # tests
  libgtest-dev libgmock-dev iproute2 libcap2-bin curl
  python3 python3-grpcio python3-grpc-tools
  # a real pre-fork third-party worker in the netns tier (gunicorn_netns_test)
  gunicorn
  # portfleetctl tests: YAML output read back, completion scripts, man page
  python3-yaml bash zsh groff-base
)
# --deploy: also what the deploy tier needs (deploy/container/build-image.sh,
# tests/deploy/): podman with runc, catatonit (kube play's pause process) and
# mmdebstrap (the base image from the Debian mirror).
if [[ "${1:-}" == "--deploy" ]]; then
  PACKAGES+=(podman runc catatonit mmdebstrap)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root to install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
