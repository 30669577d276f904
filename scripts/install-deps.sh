#!/usr/bin/env bash
# Installs everything trident's library, tests and examples use, from Debian's packages.
# Idempotent: packages already present are not asked for again, and nothing is
# downloaded when all of them are installed. The CUDA Toolkit, when present, is used
# from /usr/local/cuda as it is; it is never installed here.
# Benchmark peers (PyTorch, OpenBLAS, Google Benchmark) live in benchmarks/install-peers.sh.
set -euo pipefail

packages=(
  build-essential g++ cmake ninja-build pkg-config
  libeigen3-dev doctest-dev nlohmann-json3-dev zlib1g-dev
  libopenmpi-dev openmpi-bin
  dataset-fashion-mnist
  python3 python3-numpy python3-matplotlib
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
