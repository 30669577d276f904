#!/usr/bin/env bash
# P7: inference of Linear(1024, 1024) with bias, batch 256, 2 threads: trident's fp32 linear and
# its dynamically quantized int8 linear (bench_qlinear: per tensor, and per row) against PyTorch's
# fp32 nn.Linear and torch.ao.quantization.quantize_dynamic(qint8) on the oneDNN engine
# (peers/torch_qlinear.py). ROUNDS rounds of [bench_qlinear, torch_qlinear.py] alternate; the
# table gives medians over the rounds of GOP/s (2 * batch * 1024 * 1024 operations per call), and
# the ratios are medians of the per-round ratios. Environments as docs/BENCHMARKS.md says:
#   ours:    OMP_NUM_THREADS=2 OMP_PROC_BIND=true
#   PyTorch: OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE, torch.set_num_threads(2)
# Bars: ours int8 / ours fp32 >= 2; ours int8 / torch int8 > 1.
#
#   benchmarks/run-qlinear.sh      (env: ROUNDS=5 BATCH=256 BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
batch="${BATCH:-256}"
bench_build bench_qlinear

echo "# run-qlinear: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $rounds rounds, batch $batch, load $(cut -d' ' -f1-3 /proc/loadavg)"
bench_rounds bench_qlinear torch_qlinear.py --batch "$batch"

"$torch_python" - "$log/ours.jsonl" "$log/torch.jsonl" <<'EOF'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
med = statistics.median
pairs = list(zip(ours, torch))
def r(f):
    return med([f(o, t) for o, t in pairs])
mop = 2 * ours[0]["batch"] * ours[0]["in"] * ours[0]["out"] * 1e-6
print()
print("Linear(%d, %d) + bias inference, batch %d, 2 threads: medians over %d rounds (GOP/s at %.0f MOP per call;"
      " ratios are medians of per-round ratios)" % (ours[0]["in"], ours[0]["out"], ours[0]["batch"], len(pairs), mop))
hdr = ["impl", "us per call", "GOP/s", "vs ours fp32", "vs torch int8"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
rows = [("ours fp32", [o["fp32"] for o in ours], 1.0, r(lambda o, t: o["fp32"] / t["int8"])),
        ("ours int8 dynamic, per tensor", [o["int8"] for o in ours], r(lambda o, t: o["int8"] / o["fp32"]),
         r(lambda o, t: o["int8"] / t["int8"])),
        ("ours int8 dynamic, per row", [o["int8_row"] for o in ours], r(lambda o, t: o["int8_row"] / o["fp32"]),
         r(lambda o, t: o["int8_row"] / t["int8"])),
        ("torch fp32", [t["fp32"] for t in torch], r(lambda o, t: t["fp32"] / o["fp32"]), r(lambda o, t: t["fp32"] / t["int8"])),
        ("torch int8 dynamic (onednn)", [t["int8"] for t in torch], r(lambda o, t: t["int8"] / o["fp32"]), 1.0)]
for name, g, vf, vt in rows:
    print("| %s | %.0f | %.0f | %.2f | %.2f |" % (name, mop * 1e-3 / med(g) * 1e6, med(g), vf, vt))
print()
print("ours int8 (per tensor) / ours fp32: %.2f (bar >= 2)" % r(lambda o, t: o["int8"] / o["fp32"]))
print("ours int8 (per tensor) / torch int8: %.2f (bar > 1)" % r(lambda o, t: o["int8"] / t["int8"]))
print("per-round ours int8 / torch int8: " + ", ".join("%.2f" % (o["int8"] / t["int8"]) for o, t in pairs))
print("relative error vs fp32 (worst run): ours int8 per tensor %.2e, per row %.2e; torch int8 %.2e" %
      (max(o["err_int8"] for o in ours), max(o["err_int8_row"] for o in ours), max(t["err_int8"] for t in torch)))
if not all(o["ok"] for o in ours):
    print("bench_qlinear reported a FAILED correctness check")
    sys.exit(1)
EOF
