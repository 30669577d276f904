#!/usr/bin/env bash
# Data-parallel efficiency: the P5 MLP (784-1024-1024-10, batch 256, SGD momentum 0.9) trained
# with parallel::distributed_step over MPI (bench_dp), every rank on 1 OpenMP thread and on its
# share of the same global batch of 256. Each repetition runs, in an order rotated from one
# repetition to the next:
#   1 rank  x 1 thread   data parallel   (the baseline)
#   2 ranks x 1 thread   data parallel, zero1, zero2
#   1 rank  x 2 threads  data parallel   (context: the same 2 cores as threads of one process)
# Each run times ROUNDS rounds and reports its medians; the summary gives the medians over the
# repetitions and the medians of the per-repetition ratios: 2-rank / 1-rank samples/s (bar >=
# 1.8) and zero1, zero2 step time / data-parallel step time at 2 ranks (bar: within 10%). Each
# run also records how much of its wall time another task waited for a core (the kernel's CPU
# pressure): on a shared 2-core machine a run with much contention is not a measurement of us.
#
#   benchmarks/run-dp.sh      (env: REPS=5 ROUNDS=3 MIN_SECONDS=1 PRECISION=fp32 BATCH=256 BUCKET= BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
reps="${REPS:-5}"
rounds="${ROUNDS:-3}"
min_seconds="${MIN_SECONDS:-1}"
precision="${PRECISION:-fp32}"
batch="${BATCH:-256}"
bucket=()
[[ -n "${BUCKET:-}" ]] && bucket=(--bucket "$BUCKET")  # elements per gradient bucket (default: the step's, 2^21)
bench_build bench_dp

# Open MPI refuses to run as root without these (containers).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
log="$(mktemp -d)"
trap 'rm -rf "$log"' EXIT

# The kernel's CPU pressure stall counter (microseconds in which some task waited for a CPU), 0
# where there is none: its growth over a run, against the run's length, says how much of the
# run other work competed for the cores (our own processes never outnumber the cores).
stall_us() { [[ -r /proc/pressure/cpu ]] && head -1 /proc/pressure/cpu | sed 's/.*total=//' || echo 0; }
pressure() { [[ -r /proc/pressure/cpu ]] && echo ", cpu pressure $(head -1 /proc/pressure/cpu | cut -d' ' -f2)" || true; }

# run <ranks> <threads> <strategy>
run() {
  local s0 t0 s1 t1 contended
  s0=$(stall_us)
  t0=$(date +%s%N)
  env OMP_NUM_THREADS="$2" OMP_PROC_BIND=true mpiexec --oversubscribe --bind-to "$([[ $2 == 1 ]] && echo core || echo none)" -n "$1" \
    "$build/benchmarks/bench_dp" --strategy "$3" --precision "$precision" --batch "$batch" --rounds "$rounds" \
    --min-seconds "$min_seconds" "${bucket[@]}" --json | tee "$log/last.txt" | grep -v '^{' | grep -v '^|---' || true
  s1=$(stall_us)
  t1=$(date +%s%N)
  contended=$(awk -v s="$((s1 - s0))" -v t="$(((t1 - t0) / 1000))" 'BEGIN { printf "%.3f", (t > 0 ? s / t : 0) }')
  echo "# contended: $contended of the run's wall time (cpu pressure)"
  grep '^{' "$log/last.txt" | sed "s/^{/{\"rep\":$rep,\"contended\":$contended,/" >> "$log/dp.jsonl"
}

configs=("1 1 dp" "2 1 dp" "2 1 zero1" "2 1 zero2" "1 2 dp")
echo "# run-dp: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $reps repetitions of ${#configs[@]} runs, $rounds rounds each, $precision, global batch $batch, bucket ${BUCKET:-default}, load $(cut -d' ' -f1-3 /proc/loadavg)"
for rep in $(seq 1 "$reps"); do
  echo "# repetition $rep/$reps, load $(cut -d' ' -f1-3 /proc/loadavg)$(pressure)"
  for k in $(seq 0 $((${#configs[@]} - 1))); do
    run ${configs[$(((k + rep - 1) % ${#configs[@]}))]}
  done
done

python3 - "$log/dp.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = statistics.median
key = lambda r: (r["ranks"], r["threads"], r["strategy"])
configs = [(1, 1, "dp"), (2, 1, "dp"), (2, 1, "zero1"), (2, 1, "zero2"), (1, 2, "dp")]
by = {c: [r for r in rows if key(r) == c] for c in configs}
reps = sorted({r["rep"] for r in rows})
def at(c, rep, f):
    v = [r[f] for r in by[c] if r["rep"] == rep]
    return v[0] if v else None
def ratios(a, b, f, inv=False):
    out = []
    for rep in reps:
        x, y = at(a, rep, f), at(b, rep, f)
        if x and y:
            out.append(y / x if inv else x / y)
    return out
print()
print("MLP 784-1024-1024-10, global batch %d, %s, SGD momentum 0.9: medians over %d repetitions (each the median of its rounds);"
      " ms are the slowest rank's" % (rows[0]["batch"], rows[0]["precision"], len(reps)))
print("| ranks x threads | strategy | samples/s | step ms | forward+backward ms | distributed step ms | compute alone ms |"
      " collectives alone ms (blocking / non-blocking) | page faults per step | vs 1x1 dp |")
print("|---|---|---|---|---|---|---|---|---|---|")
for c in configs:
    if not by[c]:
        continue
    rs = by[c]
    rel = med(ratios(c, (1, 1, "dp"), "samples_per_s")) if c != (1, 1, "dp") else 1.0
    f = lambda k: med([r[k] for r in rs])
    print("| %d x %d | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f / %.2f | %.0f | %.3f |" % (c[0], c[1], c[2], f("samples_per_s"),
          f("step_ms"), f("fb_ms"), f("dist_ms"), f("compute_ms"), f("comm_ms"), f("comm_nb_ms"), f("faults"), rel))
print()
def line(label, v, bar):
    print("%s: %.3f (per repetition: %s) %s" % (label, med(v), ", ".join("%.3f" % x for x in v), bar))
line("2 ranks / 1 rank samples/s, data parallel", ratios((2, 1, "dp"), (1, 1, "dp"), "samples_per_s"), "(bar >= 1.8)")
line("zero1 / dp step time, 2 ranks", ratios((2, 1, "zero1"), (2, 1, "dp"), "step_ms"), "(bar <= 1.10)")
line("zero2 / dp step time, 2 ranks", ratios((2, 1, "zero2"), (2, 1, "dp"), "step_ms"), "(bar <= 1.10)")
if by[(1, 2, "dp")]:
    line("2 ranks x 1 thread / 1 rank x 2 threads samples/s", ratios((2, 1, "dp"), (1, 2, "dp"), "samples_per_s"), "(context)")
print("cpu contention during the runs (share of wall time another task waited for a core): median %.3f, max %.3f" %
      (med([r["contended"] for r in rows]), max(r["contended"] for r in rows)))
bad = [r for r in rows if not r["ok"]]
print("checks (updates vs single process, ranks equal, loss falls): %s; worst update error %.2e" %
      ("FAILED in %d runs" % len(bad) if bad else "ok in every run", max(r["update_err"] for r in rows)))
PY
