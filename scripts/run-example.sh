#!/usr/bin/env bash
# Builds trident's examples in build/ and runs the main one: an MLP trained on the real
# Fashion-MNIST test set bar (>= 0.885 accuracy), in fp32, with its loss/accuracy curves
# rendered to build/fashion_mnist_mlp.png. Extra arguments go to the example (--help lists them).
# scripts/compare-precisions.sh runs it in fp32, bf16 and fp16 side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" --parallel "$(nproc)" --target fashion_mnist_mlp_fp32 fashion_mnist_mlp_bf16 fashion_mnist_mlp_fp16
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} OMP_PROC_BIND=${OMP_PROC_BIND:-true}
"$build/examples/fashion_mnist_mlp_fp32" --csv "$build/fashion_mnist_mlp.csv" "$@"
scripts/plot-log.py "$build/fashion_mnist_mlp.csv" -o "$build/fashion_mnist_mlp.png"
