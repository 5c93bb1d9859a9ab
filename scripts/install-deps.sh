#!/usr/bin/env bash
# Installs the Debian 12 packages that cki's build, tests and examples need,
# skipping apt-get entirely when every package is already present.
set -euo pipefail

packages=(
  cmake g++ make
  libeigen3-dev nlohmann-json3-dev libcli11-dev catch2
  libbenchmark-dev zlib1g-dev
  dataset-fashion-mnist python3-numpy
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

echo "installing Debian packages: ${missing[*]}" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "error: installing packages needs root; run as root or install them: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
