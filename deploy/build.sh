#!/usr/bin/env bash
# Configures and builds portfleet into ./build (or $PORTFLEET_BUILD_DIR).
# Extra arguments go to cmake, e.g. -DPORTFLEET_ASAN=ON.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${PORTFLEET_BUILD_DIR:-$root/build}"
mkdir -p "$build"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-RelWithDebInfo}" "$@" >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log" >&2; exit 1; }
echo "building portfleet in $build (log: $build/build.log) ..." >&2
if ! cmake --build "$build" -j"$(nproc)" >"$build/build.log" 2>&1; then
  grep -E -B2 -A8 'error|Error' "$build/build.log" | head -80 >&2
  echo "build failed; full log: $build/build.log" >&2
  exit 1
fi
