#!/usr/bin/env bash
# Builds the libFuzzer targets and the seed corpus generator with clang 14,
# AddressSanitizer and UndefinedBehaviorSanitizer, then writes the seed
# corpora. The library's own CMake build does not need clang.
#
#   fuzz/build.sh [BUILD_DIR]     (default: build-fuzz beside fuzz/)
#
# Needs clang++-14 and libclang-rt-14-dev (Debian 12), libeigen3-dev and
# nlohmann-json3-dev. Output in BUILD_DIR: fuzz_safetensors,
# fuzz_shard_index, make_seed_corpus and seeds/{safetensors,shard_index}.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build-fuzz}"
cxx="${CXX_FUZZ:-clang++-14}"
mkdir -p "$build"

common=(-std=c++17 -g -O1 -fno-omit-frame-pointer
        -fsanitize=address,undefined -fno-sanitize-recover=all
        -Wall -Wextra
        -I "$root/include" -I "$root/fuzz" -I /usr/include/eigen3)

for target in fuzz_safetensors fuzz_shard_index; do
  echo "building $target" >&2
  "$cxx" "${common[@]}" -fsanitize=fuzzer "$root/fuzz/$target.cpp" -o "$build/$target"
done

echo "building make_seed_corpus" >&2
"$cxx" "${common[@]}" "$root/fuzz/make_seed_corpus.cpp" -o "$build/make_seed_corpus"

rm -rf "$build/seeds"
"$build/make_seed_corpus" "$build/seeds"
echo "seeds: $(find "$build/seeds/safetensors" -type f | wc -l) safetensors files," \
     "$(find "$build/seeds/shard_index" -type f | wc -l) index inputs in $build/seeds" >&2
