#!/usr/bin/env bash
# Configures, builds and runs every trident test (CTest) in build/ (or $1).
# The CUDA tests build whenever nvcc is present and skip at run time without a GPU; the MPI
# tests run under mpiexec with 2 and 4 ranks, oversubscribed.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
# Open MPI refuses to start as root unless told that it is wanted (CI runs as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" --parallel "$(nproc)"
ctest --test-dir "$build" --output-on-failure --parallel "$(nproc)" --timeout 1500
