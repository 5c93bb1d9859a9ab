#!/usr/bin/env bash
# Installs missing Debian packages, builds cki in Release with its tests and
# examples, and runs the whole test suite with CTest.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${CKI_BUILD_DIR:-$root/build/release}"
jobs="${CKI_JOBS:-$(nproc)}"

bash "$root/scripts/install-deps.sh"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs"
