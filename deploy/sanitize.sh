#!/usr/bin/env bash
# Builds portfleet with a sanitizer and runs the unit and netns test tiers
# under it.
#
#   deploy/sanitize.sh asan    # ASan + UBSan (and LeakSanitizer) in build-asan/,
#                              # built with clang together with the libFuzzer
#                              # targets that deploy/fuzz.sh then runs
#   deploy/sanitize.sh tsan    # ThreadSanitizer in build-tsan/
#
# Extra arguments go to cmake (through deploy/build.sh). Environment:
#   PORTFLEET_BUILD_DIR      build directory (default build-asan / build-tsan)
#   PORTFLEET_CTEST_LABELS   ctest -L regex (default 'unit|netns|e2e')
#   PORTFLEET_CTEST_ARGS     extra ctest arguments, e.g. '-R AgentTest'
#
# Sanitizer reports: every process the tests start (test binaries, and the
# agents and workers they spawn, whose stderr a test may swallow) writes its
# ASan/LSan/TSan report to $build/sanitizer-logs/<tool>.<pid>; UBSan reports
# go to stderr (see below). The script prints every report and exits non-zero
# if there is one, even when ctest passed.
#
# Suppressions live in deploy/sanitizers/ with a reason per entry; they cover
# uninstrumented system libraries only, never portfleet code.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

usage() { echo "usage: $0 asan|tsan [cmake args...]" >&2; exit 2; }
(($# >= 1)) || usage
mode="$1"; shift
extra=()
case "$mode" in
  asan)
    # clang: the same build gives the fuzz targets (deploy/fuzz.sh).
    option=-DPORTFLEET_ASAN=ON
    extra=(-DPORTFLEET_FUZZ=ON)
    export CC=clang CXX=clang++
    ;;
  tsan)
    option=-DPORTFLEET_TSAN=ON
    # GCC 12 reports false -Wmaybe-uninitialized inside <regex>/<functional>
    # when sanitizers instrument the code; keep the warning, do not fail on
    # it in sanitizer builds.
    extra=(-DCMAKE_CXX_FLAGS=-Wno-error=maybe-uninitialized)
    ;;
  *) usage ;;
esac

build="${PORTFLEET_BUILD_DIR:-$root/build-$mode}"
labels="${PORTFLEET_CTEST_LABELS:-unit|netns|e2e}"
supp="$root/deploy/sanitizers"
logs="$build/sanitizer-logs"

# Options common to the build (gtest_discover_tests runs each test binary at
# build time) and the test run. halt_on_error: the first report ends the
# process with a non-zero exit, so a test cannot pass over it.
case "$mode" in
  asan)
    export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:print_summary=1"
    export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:report_error_type=1"
    export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
    ;;
  tsan)
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=4:suppressions=$supp/tsan.supp:print_suppressions=0"
    ;;
esac

now() { date +%s; }
t0=$(now)
PORTFLEET_BUILD_DIR="$build" "$root/deploy/build.sh" "$option" "${extra[@]}" "$@"
t1=$(now)
echo "sanitize($mode): build took $((t1 - t0))s" >&2

# Reports go to files from here on: children's stderr is not always shown.
rm -rf "$logs"
mkdir -p "$logs"
case "$mode" in
  asan)
    export ASAN_OPTIONS="$ASAN_OPTIONS:log_path=$logs/asan"
    export UBSAN_OPTIONS="$UBSAN_OPTIONS:log_path=$logs/ubsan"
    ;;
  tsan) export TSAN_OPTIONS="$TSAN_OPTIONS:log_path=$logs/tsan" ;;
esac

rc=0
# Sanitized binaries run 2-15x slower: give each test more time than CI does.
# shellcheck disable=SC2086
(cd "$build" && ctest -L "$labels" --output-on-failure --timeout 900 -j2 \
  ${PORTFLEET_CTEST_ARGS:-}) || rc=$?
t2=$(now)
echo "sanitize($mode): tests took $((t2 - t1))s (ctest exit $rc)" >&2

# UBSan reports may go to the process's stderr instead of log_path (GCC 12's
# combined runtime ignores it). Test binaries' stderr is in ctest's log;
# copy any report found there next to the others. (An agent or worker that
# tests start writes stderr to a per-test log file; its UBSan abort shows as
# a failing test, not here.)
last="$build/Testing/Temporary/LastTest.log"
if [[ -f "$last" ]] && grep -qE 'runtime error:|ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer' "$last"; then
  grep -nE -A25 'runtime error:|ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer' \
    "$last" >"$logs/from-ctest-log.txt" || true
fi

shopt -s nullglob
reports=("$logs"/*)
if ((${#reports[@]} > 0)); then
  for r in "${reports[@]}"; do
    echo "===== sanitizer report: $r" >&2
    cat "$r" >&2
  done
  echo "sanitize($mode): ${#reports[@]} sanitizer report(s) in $logs" >&2
  ((rc != 0)) || rc=1
fi
echo "sanitize($mode): total $((t2 - t0))s" >&2
exit "$rc"
