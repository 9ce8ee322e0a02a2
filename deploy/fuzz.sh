#!/usr/bin/env bash
# Builds the libFuzzer targets with clang, ASan and UBSan (in build-asan/,
# the build deploy/sanitize.sh asan makes, so CI builds once) and runs each
# for a bounded time on a copy of its seed corpus
# (tests/fuzz/corpus/<target>/). Exits non-zero on any crash, leak or
# sanitizer report; the input that caused it is kept in
# build-asan/artifacts/<target>/ (reproduce: build-asan/tests/<target> FILE).
#
#   deploy/fuzz.sh                    # every target, PORTFLEET_FUZZ_SECONDS each
#   deploy/fuzz.sh spec_fuzz          # one target
#
# Environment: PORTFLEET_FUZZ_SECONDS (default 30), PORTFLEET_BUILD_DIR
# (default build-asan).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${PORTFLEET_BUILD_DIR:-$root/build-asan}"
seconds="${PORTFLEET_FUZZ_SECONDS:-30}"
targets=("$@")
((${#targets[@]})) || targets=(spec_fuzz state_fuzz authz_fuzz control_fuzz
                               takeover_fuzz)
"$root/deploy/install-deps.sh"
mkdir -p "$build"
t0=$(date +%s)
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPORTFLEET_FUZZ=ON -DPORTFLEET_ASAN=ON >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log" >&2; exit 1; }
echo "fuzz: building ${targets[*]} in $build ..." >&2
if ! cmake --build "$build" -j"$(nproc)" --target "${targets[@]}" \
    >"$build/build.log" 2>&1; then
  grep -E -B2 -A8 'error' "$build/build.log" | head -80 >&2
  echo "fuzz: build failed; full log: $build/build.log" >&2
  exit 1
fi
echo "fuzz: build took $(($(date +%s) - t0))s" >&2
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export LSAN_OPTIONS="suppressions=$root/deploy/sanitizers/lsan.supp:print_suppressions=0"
failed=()
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t"
  artifacts="$build/artifacts/$t"
  rm -rf "$corpus"
  mkdir -p "$corpus" "$artifacts"
  cp "$root/tests/fuzz/corpus/$t/"* "$corpus/"
  echo "fuzz: $t for ${seconds}s" >&2
  if ! "$build/tests/$t" -max_total_time="$seconds" -timeout=10 \
      -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "$corpus" >"$build/$t.log" 2>&1; then
    tail -40 "$build/$t.log" >&2
    failed+=("$t")
  else
    grep -E '^stat::(number_of_executed_units|new_units_added)' \
      "$build/$t.log" | sed "s/^/fuzz: $t: /" >&2 || true
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]} (inputs in $build/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} target(s), 0 crashes, $(($(date +%s) - t0))s" >&2
