#!/usr/bin/env bash
# Installs the peers that benchmarks/ compares trident against, from Debian's packages:
# PyTorch (python3-torch, CPU), OpenBLAS and Google Benchmark. Tests never need these.
set -euo pipefail

packages=(python3-torch libopenblas-dev libbenchmark-dev libeigen3-dev)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-peers: all ${#packages[@]} packages already installed"
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
