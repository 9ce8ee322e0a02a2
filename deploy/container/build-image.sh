#!/bin/bash
# Builds the portfleet image with podman on a Debian 12 host without an image
# registry: the Debian base images are made from the host's Debian mirror
# with mmdebstrap and imported under the names the Containerfile's short
# names resolve to.
#
#   deploy/container/build-image.sh                 # full multi-stage build
#                                                   # (deploy/container/Containerfile)
#   deploy/container/build-image.sh --runtime-only  # runtime image from the
#                                                   # binaries in build/ (no compiler)
#   options: --tag NAME (default portfleet:0.1.0), --build-dir DIR (default build)
#
# Quirks of small VMs it handles itself, through a private containers.conf
# (CONTAINERS_CONF, the host's configuration is not touched):
#   - runc, not crun (crun refuses a hybrid cgroup layout);
#   - cgroup_manager "cgroupfs" and events_logger "file" (no systemd as PID 1);
#   - default_ulimits nofile at the host's hard limit and nproc 4096
#     (podman's rootful defaults, 1048576, cannot be set without
#     CAP_SYS_RESOURCE), passed to podman build's RUN steps as --ulimit.
# Prints how long each step took. Needs root (rootful podman).
set -eu

tag=portfleet:0.1.0
build_dir=build
runtime_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime-only) runtime_only=1 ;;
    --tag) tag=$2; shift ;;
    --build-dir) build_dir=$2; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
work=${PORTFLEET_IMAGE_WORK:-/var/tmp/portfleet-image}
mkdir -p "$work"

step_start=0
step() { step_start=$(date +%s); echo "== $*"; }
done_step() { echo "   took $(( $(date +%s) - step_start ))s"; }

step "packages: podman runc catatonit mmdebstrap (deploy/install-deps.sh --deploy)"
deploy/install-deps.sh --deploy
done_step

nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
# nproc: runc fails to set anything much above a few thousand here (EPERM
# for 50000 with a hard limit of 96363); 4096 processes per uid is plenty
# for an agent and its workers.
nproc=4096
cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$work/containers.conf"
# podman build's RUN steps do not take default_ulimits: pass them.
ulimits="--ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"

# The host's Debian sources (deb822 or one-line format).
sources=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
  if [ -s "$f" ]; then
    sources=$f
    break
  fi
done
[ -n "$sources" ] || { echo "build-image.sh: no Debian apt sources found" >&2; exit 1; }

# Runtime libraries: the same list as the Containerfile's runtime stage
# (checked below, so that the two cannot drift apart).
runtime_pkgs="libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libbpf1 libelf1 libsystemd0 libssl3 libre2-9 libc-ares2 zlib1g ca-certificates"
for p in $runtime_pkgs; do
  grep -q "$p" deploy/container/Containerfile || {
    echo "build-image.sh: $p is not in the Containerfile's runtime stage" >&2; exit 1; }
done

if [ "$runtime_only" = 1 ]; then
  for b in agent/portfleet-agent worker/portfleet-worker ctl/portfleetctl; do
    [ -x "$build_dir/$b" ] || { echo "build-image.sh: $build_dir/$b missing (deploy/build.sh)" >&2; exit 1; }
  done
  # Tagged by its package list: a changed list makes a new base.
  base=localhost/portfleet-runtime-base:bookworm-$(echo "$runtime_pkgs" | sha256sum | cut -c1-12)
  step "runtime base: mmdebstrap minbase bookworm + runtime libraries"
  if [ -n "${PORTFLEET_REUSE_BASE:-}" ] && podman image exists "$base"; then
    echo "   reusing $base"
  else
  include=$(echo $runtime_pkgs | tr ' ' ',')
  mmdebstrap --quiet --variant=minbase --include="$include" bookworm \
    "$work/runtime.tar" "$sources"
  podman import --quiet "$work/runtime.tar" "$base" >/dev/null
  rm -f "$work/runtime.tar"
  fi
  done_step
  step "image $tag from $build_dir (runtime only)"
  ctx="$work/context"
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp "$build_dir/agent/portfleet-agent" "$build_dir/worker/portfleet-worker" \
     "$build_dir/ctl/portfleetctl" deploy/examples/quickstart.textproto "$ctx/"
  strip --strip-debug "$ctx/portfleet-agent" "$ctx/portfleet-worker" "$ctx/portfleetctl"
  echo "FROM $base" > "$ctx/Containerfile"
  cat >> "$ctx/Containerfile" <<'CF'
COPY portfleet-agent portfleet-worker portfleetctl /usr/local/bin/
COPY quickstart.textproto /etc/portfleet/fleet.textproto
RUN for b in portfleet-agent portfleet-worker portfleetctl; do \
      if ldd /usr/local/bin/$b | grep 'not found'; then exit 1; fi; \
    done \
 && portfleet-agent --check --config /etc/portfleet/fleet.textproto
ENTRYPOINT ["/usr/local/bin/portfleet-agent"]
CMD ["--config", "/etc/portfleet/fleet.textproto"]
CF
  podman build --quiet $ulimits --network=none -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
  done_step
else
  step "base images: mmdebstrap minbase bookworm -> debian:bookworm, debian:bookworm-slim"
  mmdebstrap --quiet --variant=minbase bookworm "$work/base.tar" "$sources"
  # FROM debian:bookworm resolves to docker.io/library/debian (podman's
  # short-name alias), so a localhost/ name would not be used.
  podman import --quiet "$work/base.tar" docker.io/library/debian:bookworm >/dev/null
  podman tag docker.io/library/debian:bookworm docker.io/library/debian:bookworm-slim
  rm -f "$work/base.tar"
  done_step
  step "image $tag: deploy/container/Containerfile (multi-stage: build on bookworm, run on bookworm-slim)"
  git archive HEAD | podman build $ulimits --network=host -f deploy/container/Containerfile -t "$tag" -
  done_step
fi
podman image ls "$tag"
