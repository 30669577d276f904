#!/usr/bin/env bash
# P2 / P2b: trident's GEMM against OpenBLAS, Eigen (in bench_gemm) and PyTorch (peers/torch_gemm.py),
# 2 threads, in one invocation: ROUNDS rounds of [bench_gemm, torch_gemm.py] alternate, and the
# table gives medians over the rounds. Environments as docs/BENCHMARKS.md says:
#   ours (and OpenBLAS/Eigen in the same process): OMP_NUM_THREADS=2 OMP_PROC_BIND=true OPENBLAS_CORETYPE=SkylakeX
#   PyTorch: OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE, torch.set_num_threads(2)
#
#   benchmarks/run-gemm.sh            (env: ROUNDS=5 SIZES=256,512,1024,2048 BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sizes="${SIZES:-256,512,1024,2048}"
bench_build bench_gemm

echo "# run-gemm: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $rounds rounds, sizes $sizes"
bench_rounds bench_gemm torch_gemm.py --sizes "$sizes"

"$torch_python" - "$log/ours.jsonl" "$log/torch.jsonl" <<'EOF'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
med = statistics.median
def by_n(runs):
    out = {}
    for run in runs:
        for r in run["results"]:
            out.setdefault(r["n"], []).append(r)
    return out
o, t = by_n(ours), by_n(torch)
print()
print("GEMM, M=N=K, 2 threads: medians over %d rounds (GFLOP/s; ratios are medians of per-round ratios)" % len(ours))
hdr = ("n", "ours fp32", "OpenBLAS", "Eigen", "torch fp32", "FMA ceil", "ours/OB", "ours/Eigen", "ours/torch",
       "%ceil", "ours bf16", "torch bf16", "bf16/torch")
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for n in sorted(o):
    ro, rt = o[n], t.get(n, [])
    pair32 = [a["ours_fp32"] / b["torch_fp32"] for a, b in zip(ro, rt)]
    pair16 = [a["ours_bf16"] / b["torch_bf16"] for a, b in zip(ro, rt)]
    row = [str(n),
           "%.1f" % med([r["ours_fp32"] for r in ro]),
           "%.1f" % med([r["openblas_fp32"] for r in ro]),
           "%.1f" % med([r["eigen_fp32"] for r in ro]),
           "%.1f" % med([r["torch_fp32"] for r in rt]) if rt else "-",
           "%.1f" % med([r["fma_ceiling"] for r in ro]),
           "%.3f" % med([r["ratio_openblas"] for r in ro]),
           "%.3f" % med([r["ratio_eigen"] for r in ro]),
           "%.3f" % med(pair32) if pair32 else "-",
           "%.1f%%" % (100 * med([r["frac_ceiling"] for r in ro])),
           "%.1f" % med([r["ours_bf16"] for r in ro]),
           "%.1f" % med([r["torch_bf16"] for r in rt]) if rt else "-",
           "%.3f" % med(pair16) if pair16 else "-"]
    print("| " + " | ".join(row) + " |")
errs = [(r["n"], r["err_fp32"], r["err_bf16"]) for run in ours for r in run["results"]]
print("max relative error vs OpenBLAS over all runs: fp32 %.2e, bf16 %.2e" %
      (max(e[1] for e in errs), max(e[2] for e in errs)))
EOF
