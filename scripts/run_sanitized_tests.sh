#!/usr/bin/env bash
# Builds cki's whole test suite, examples and cki-splice under
# AddressSanitizer and UndefinedBehaviorSanitizer in its own build folder and
# runs it with CTest. Any sanitizer report fails the test that caused it.
# The flags are those of the "sanitize" preset in CMakePresets.json; the
# build folder differs so this never touches the Release build.
#
#   scripts/run_sanitized_tests.sh
#
# Environment: CKI_ASAN_BUILD_DIR (default build-asan at the top of the
# repository), CKI_JOBS (default: the number of cores).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${CKI_ASAN_BUILD_DIR:-$root/build-asan}"
jobs="${CKI_JOBS:-$(nproc)}"

bash "$root/scripts/install-deps.sh"

cmake -S "$root" -B "$build" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" \
  -DCKI_BUILD_BENCHMARKS=OFF
cmake --build "$build" -j "$jobs"

# abort_on_error makes a report fail the test even where a program catches
# the exit status; detect_leaks covers LeakSanitizer too.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$build" --output-on-failure -j "$jobs"
