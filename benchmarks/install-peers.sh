#!/usr/bin/env bash
# Installs the peers that benchmarks/ compares trident against, from Debian's packages:
# PyTorch (python3-torch, CPU), OpenBLAS, Eigen and Google Benchmark. Tests never need these.
set -euo pipefail
exec "$(dirname "$0")/../scripts/apt-install.sh" python3-torch libopenblas-dev libbenchmark-dev libeigen3-dev
