#!/usr/bin/env bash
# Runs the Fashion-MNIST experiment: installs missing Debian packages, builds
# the experiment in Release and prints its Markdown table on stdout.
# Arguments are passed to the experiment, for example --quick or --json FILE.
# Environment: CKI_BUILD_DIR (build directory, default build-fashion-mnist in
# the repository), CKI_JOBS (parallel build jobs, default 2),
# CKI_FASHION_MNIST_NATIVE (ON compiles the experiment for this machine's CPU
# with -march=native, about 2x faster on an AVX-512 machine; OFF for a portable
# build; default ON, since the script builds and runs on the same machine).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${CKI_BUILD_DIR:-$root/build-fashion-mnist}"
jobs="${CKI_JOBS:-2}"
native="${CKI_FASHION_MNIST_NATIVE:-ON}"
packages=(cmake g++ libeigen3-dev nlohmann-json3-dev libcli11-dev catch2 zlib1g-dev dataset-fashion-mnist)

# Install the packages that are missing, with sudo unless running as root.
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if ((${#missing[@]} > 0)); then
  echo "installing missing Debian packages: ${missing[*]}" >&2
  sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y "${missing[@]}"
fi

# Configure and build only the experiment.
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DCKI_BUILD_TESTS=OFF \
  -DCKI_FASHION_MNIST_NATIVE="$native" >&2
cmake --build "$build_dir" -j"$jobs" --target fashion_mnist >&2

# Run it; the table goes to stdout, progress to stderr.
exec "$build_dir/examples/fashion_mnist/fashion_mnist" "$@"
