#!/usr/bin/env bash
# P1: trident's element-wise and reduction kernels against STREAM's loops, in one process,
# interleaved (bench_bandwidth). 2 threads, as docs/BENCHMARKS.md says for our programs.
#
#   benchmarks/run-bandwidth.sh      (env: ELEMENTS=67108864 ROUNDS=15 BUILD_DIR=build-bench)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build-bench}"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTRIDENT_BUILD_BENCHMARKS=ON \
  -DTRIDENT_BUILD_TESTS=OFF -DTRIDENT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" --target bench_bandwidth >/dev/null
echo "# run-bandwidth: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores"
env OMP_NUM_THREADS=2 OMP_PROC_BIND=true "$build/benchmarks/bench_bandwidth" "${ELEMENTS:-67108864}" "${ROUNDS:-15}"
