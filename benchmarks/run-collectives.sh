#!/usr/bin/env bash
# P6: trident's mpi_comm collectives against the plain MPI calls they wrap (bench_collectives:
# all_reduce, reduce_scatter, all_gather, broadcast on fp32; bf16 all_reduce against MPI's fp32
# all_reduce of the same element count; bf16 all_gather against MPI_Allgather of 2-byte words),
# on the same buffers, in the same process, ours and MPI alternating round by round. One run per
# rank count (Open MPI, --oversubscribe: 4 ranks share the 2 cores); each prints its table of
# medians over ROUNDS rounds: bus bandwidth as nccl-tests counts it, and ours/MPI (bar >= 0.95).
# Each rank runs one OpenMP thread.
#
#   benchmarks/run-collectives.sh   (env: ROUNDS=5 RANKS="2 4" SIZES=64K,1M,16M,64M MIN_SECONDS=0.2
#                                    JSON=1 BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sizes="${SIZES:-64K,1M,16M,64M}"
min_seconds="${MIN_SECONDS:-0.2}"
json=()
[[ "${JSON:-0}" == 1 ]] && json=(--json)
bench_build bench_collectives

# Open MPI refuses to run as root without these (containers).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for n in ${RANKS:-2 4}; do
  echo "# run-collectives: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $n ranks, $rounds rounds, sizes $sizes, load $(cut -d' ' -f1-3 /proc/loadavg)"
  env OMP_NUM_THREADS=1 mpiexec --oversubscribe -n "$n" "$build/benchmarks/bench_collectives" \
    --sizes "$sizes" --rounds "$rounds" --min-seconds "$min_seconds" "${json[@]}"
  echo
done
