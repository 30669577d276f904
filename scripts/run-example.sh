#!/usr/bin/env bash
# Builds trident's examples in build/ and runs the main one, once per precision policy.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" --parallel "$(nproc)" --target precision_tour_fp32 precision_tour_bf16 precision_tour_fp16
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} OMP_PROC_BIND=${OMP_PROC_BIND:-true}
for p in fp32 bf16 fp16; do
  "$build/examples/precision_tour_$p"
  echo
done
