#!/usr/bin/env bash
# Installs everything trident's library, tests and examples use, from Debian's packages.
# Idempotent: packages already present are not asked for again. The CUDA Toolkit, when
# present, is used from /usr/local/cuda as it is; it is never installed here.
# Benchmark peers (PyTorch, OpenBLAS, Google Benchmark) live in benchmarks/install-peers.sh.
set -euo pipefail
exec "$(dirname "$0")/apt-install.sh" \
  build-essential g++ cmake ninja-build pkg-config \
  libeigen3-dev doctest-dev nlohmann-json3-dev zlib1g-dev \
  libopenmpi-dev openmpi-bin \
  dataset-fashion-mnist \
  python3 python3-numpy python3-matplotlib
