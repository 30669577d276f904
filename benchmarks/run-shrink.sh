#!/usr/bin/env bash
# P7 (pruning): inference latency of the MLP 784-1024-1024-10 (fp32, batch 256, 2 threads)
# against the same MLP structurally pruned to 50% and 25% of its hidden units and built at the
# smaller sizes (bench_shrink). No PyTorch peer: this is our dense model against our shrunk
# one. ROUNDS runs of bench_shrink (each times the three models --rounds 3 times, one after
# another); the table gives medians over the runs, the speedups are medians of the per-run
# speedups, against the ideal ratio dense FLOPs / shrunk FLOPs (bar: measured/ideal >= 0.7).
# Environment as docs/BENCHMARKS.md says: OMP_NUM_THREADS=2 OMP_PROC_BIND=true.
#
#   benchmarks/run-shrink.sh      (env: ROUNDS=5 BATCH=256 BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
batch="${BATCH:-256}"
bench_build bench_shrink

echo "# run-shrink: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $rounds rounds, batch $batch, load $(cut -d' ' -f1-3 /proc/loadavg)"
log="$(mktemp -d)"
trap 'rm -rf "$log"' EXIT
for r in $(seq 1 "$rounds"); do
  echo "# round $r/$rounds: bench_shrink"
  env OMP_NUM_THREADS=$threads OMP_PROC_BIND=true "$build/benchmarks/bench_shrink" --batch "$batch" --rounds 3 --json |
    tee "$log/ours.$r.txt" | grep -v '^{' || true
  grep '^{' "$log/ours.$r.txt" >> "$log/ours.jsonl"
done

python3 - "$log/ours.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = statistics.median
print()
print("MLP 784-1024-1024-10 eval forward, fp32, batch %d, 2 threads: dense vs structurally shrunk, medians over %d runs"
      % (runs[0]["batch"], len(runs)))
print("| model | ms/batch | speedup | ideal (FLOPs) | measured/ideal |")
print("|---|---|---|---|---|")
print("| dense 1024 | %.3f | 1.000 | 1.000 | 1.000 |" % med([r["dense_ms"] for r in runs]))
for key, name in (("half", "shrunk 512 (50%)"), ("quarter", "shrunk 256 (25%)")):
    sp = med([r["speedup_" + key] for r in runs])
    ideal = runs[0]["ideal_" + key]
    print("| %s | %.3f | %.3f | %.3f | %.3f |" % (name, med([r[key + "_ms"] for r in runs]), sp, ideal, sp / ideal))
print()
for key in ("half", "quarter"):
    print("per-run %s speedups: %s" % (key, ", ".join("%.3f" % r["speedup_" + key] for r in runs)))
print("measured/ideal (bar >= 0.7): 50%% %.3f, 25%% %.3f" %
      (med([r["speedup_half"] for r in runs]) / runs[0]["ideal_half"], med([r["speedup_quarter"] for r in runs]) / runs[0]["ideal_quarter"]))
print("shrunk vs zeroed dense, worst max rel. difference: %.2e" % max(max(r["exact_half"], r["exact_quarter"]) for r in runs))
PY
