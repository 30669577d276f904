#!/usr/bin/env bash
# P5: training the MLP 784-1024-1024-10, batch 256, SGD(0.01, momentum 0.9): trident (bench_mlp:
# fp32 and bf16_mixed) against the same model written plainly in PyTorch (peers/torch_mlp.py:
# fp32, and bf16 autocast), 2 threads. ROUNDS rounds of [bench_mlp, torch_mlp.py] alternate; the
# table gives medians over the rounds of samples/s, and the ratios are medians of the per-round
# ratios. Environments as docs/BENCHMARKS.md says:
#   ours:    OMP_NUM_THREADS=2 OMP_PROC_BIND=true
#   PyTorch: OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE, torch.set_num_threads(2)
#
#   benchmarks/run-mlp.sh      (env: ROUNDS=5 BATCH=256 BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
batch="${BATCH:-256}"
bench_build bench_mlp

echo "# run-mlp: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $rounds rounds, batch $batch, load $(cut -d' ' -f1-3 /proc/loadavg)"
bench_rounds bench_mlp torch_mlp.py --batch "$batch"

"$torch_python" - "$log/ours.jsonl" "$log/torch.jsonl" <<'EOF'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
med = statistics.median
mflop = 6 * (784 * 1024 + 1024 * 1024 + 1024 * 10) * 1e-6
pairs = list(zip(ours, torch))
def r(f):
    return med([f(o, t) for o, t in pairs])
print()
print("MLP 784-1024-1024-10 training, batch %d, SGD momentum 0.9, 2 threads: medians over %d rounds"
      " (samples/s; GFLOP/s at %.2f MFLOP/sample; ratios are medians of per-round ratios)" % (ours[0]["batch"], len(ours), mflop))
hdr = ["impl", "samples/s", "GFLOP/s", "vs torch fp32", "vs torch bf16"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
rows = [("ours fp32", [o["fp32"] for o in ours], r(lambda o, t: o["fp32"] / t["fp32"]), r(lambda o, t: o["fp32"] / t["bf16"])),
        ("ours bf16_mixed", [o["bf16_mixed"] for o in ours], r(lambda o, t: o["bf16_mixed"] / t["fp32"]),
         r(lambda o, t: o["bf16_mixed"] / t["bf16"])),
        ("torch fp32", [t["fp32"] for t in torch], 1.0, r(lambda o, t: t["fp32"] / t["bf16"])),
        ("torch bf16 autocast", [t["bf16"] for t in torch], r(lambda o, t: t["bf16"] / t["fp32"]), 1.0)]
for name, sps, vf, vb in rows:
    print("| %s | %.0f | %.1f | %.3f | %.3f |" % (name, med(sps), med(sps) * mflop * 1e-3, vf, vb))
print()
print("ours fp32 / torch fp32: %.3f (bar >= 1.5, goal >= 2)" % r(lambda o, t: o["fp32"] / t["fp32"]))
print("per-round ours fp32 / torch fp32: " + ", ".join("%.3f" % (o["fp32"] / t["fp32"]) for o, t in pairs))
print("gradients vs fp64 (relative 2-norm, worst tensor, worst run): fp32 %.2e, bf16_mixed %.2e" %
      (max(o["err_fp32"] for o in ours), max(o["err_bf16"] for o in ours)))
EOF
