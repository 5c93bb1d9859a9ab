#!/usr/bin/env bash
# CI entry for fuzzing: installs clang 14 and its sanitizer and libFuzzer
# runtimes from Debian when missing, then builds the fuzz targets and runs
# each for 60 seconds (CKI_FUZZ_SECONDS overrides). Exits non-zero when a
# target finds a crash, a sanitizer report or an uncaught exception; the
# input is then in build-fuzz/artifacts/TARGET/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${CKI_FUZZ_SECONDS:-60}"

packages=(clang-14 libclang-rt-14-dev libeigen3-dev nlohmann-json3-dev)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: installing packages needs root; run as root or install them: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

exec bash "$root/fuzz/run.sh" "$seconds"
