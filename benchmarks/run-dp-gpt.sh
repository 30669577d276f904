#!/usr/bin/env bash
# Data-parallel efficiency on the large GPT shape of P4 (bench_dp_gpt): every rank on 1 OpenMP
# thread and on its share of the same global batch of 8 sequences of 256 tokens. Each
# repetition runs 1 rank (data parallel, the baseline), then 2 ranks with data parallel, data
# parallel with MPI's own all-reduce instead of mpi_comm's shared-memory one (--intra-node mpi,
# for comparison), zero1, zero2 and zero3; the summary gives the median over the repetitions
# of each run's median tokens/s and the medians of the per-repetition ratios: 2-rank / 1-rank
# tokens/s (bar >= 1.8) and each ZeRO stage's step time / data parallel's at 2 ranks (bars:
# ZeRO-1/2 within 10%, ZeRO-3 within 30%).
#
#   benchmarks/run-dp-gpt.sh      (env: REPS=3 ROUNDS=3 STEPS=3 PRECISION=fp32 BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
reps="${REPS:-3}"
rounds="${ROUNDS:-3}"
steps="${STEPS:-3}"
precision="${PRECISION:-fp32}"
bench_build bench_dp_gpt

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
log="$(mktemp -d)"
trap 'rm -rf "$log"' EXIT

# run <ranks> <strategy> [intra-node]
run() {
  env OMP_NUM_THREADS=1 OMP_PROC_BIND=true mpiexec --oversubscribe --bind-to core -n "$1" \
    "$build/benchmarks/bench_dp_gpt" --strategy "$2" --intra-node "${3:-shm}" --precision "$precision" --rounds "$rounds" --steps "$steps" --json |
    tee -a "$log/all.txt" | grep -v '^{' | grep -v '^|' || true
}

for rep in $(seq 1 "$reps"); do
  echo "# repetition $rep/$reps ($(uptime | sed 's/.*load/load/'))"
  run 1 dp
  run 2 dp
  run 2 dp mpi
  for s in zero1 zero2 zero3; do run 2 "$s"; done
done

python3 - "$log/all.txt" "$reps" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
reps = int(sys.argv[2])
runs = 6
if len(rows) != reps * runs or not all(r["ok"] for r in rows):
    print("some runs failed or did not check out:", [r for r in rows if not r["ok"]]); sys.exit(1)
by_rep = [rows[i * runs:(i + 1) * runs] for i in range(reps)]
def med(f): return statistics.median(f(rep) for rep in by_rep)
print("| run | tokens/s (median of %d) | step ms |" % reps)
print("|---|---|---|")
names = ["1 rank, data parallel", "2 ranks, data parallel", "2 ranks, data parallel, MPI's all-reduce",
         "2 ranks, zero1", "2 ranks, zero2", "2 ranks, zero3"]
for k, name in enumerate(names):
    print("| %s | %.0f | %.0f |" % (name, med(lambda r: r[k]["tokens_per_s"]), med(lambda r: r[k]["step_ms"])))
print("2 ranks / 1 rank tokens/s (data parallel): %.3f (bar >= 1.8)" % med(lambda r: r[1]["tokens_per_s"] / r[0]["tokens_per_s"]))
print("  the same with MPI's all-reduce: %.3f; its step time / data parallel's: %.3f" %
      (med(lambda r: r[2]["tokens_per_s"] / r[0]["tokens_per_s"]), med(lambda r: r[2]["step_ms"] / r[1]["step_ms"])))
for k, (name, bar) in enumerate([("zero1", 1.10), ("zero2", 1.10), ("zero3", 1.30)], start=3):
    print("%s / data parallel step time at 2 ranks: %.3f (bar <= %.2f)" % (name, med(lambda r: r[k]["step_ms"] / r[1]["step_ms"]), bar))
PY
