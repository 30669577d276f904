#!/usr/bin/env bash
# P3: trident's fused AdamW step (bench_adamw, which also measures the STREAM triad in the same
# process) against torch.optim.AdamW (peers/torch_adamw.py: foreach=False, foreach=True, and
# fused=True where the installed torch has it), 64Mi fp32 parameters, 2 threads. ROUNDS rounds of
# [bench_adamw, torch_adamw.py] alternate; the table gives medians over the rounds, and ours/torch
# is the median of the per-round ratios against the fastest torch implementation of that round.
# Environments as docs/BENCHMARKS.md says:
#   ours:    OMP_NUM_THREADS=2 OMP_PROC_BIND=true
#   PyTorch: OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE, torch.set_num_threads(2)
#
#   benchmarks/run-adamw.sh      (env: ROUNDS=5 ELEMENTS=67108864 TENSORS=1 BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
elements="${ELEMENTS:-67108864}"
tensors="${TENSORS:-1}"
bench_build bench_adamw

echo "# run-adamw: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $rounds rounds, $elements parameters in $tensors tensor(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
bench_rounds bench_adamw torch_adamw.py --elements "$elements" --tensors "$tensors"

"$torch_python" - "$log/ours.jsonl" "$log/torch.jsonl" <<'EOF'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
med = statistics.median
n = ours[0]["params"]
gb = 28.0 * n * 1e-9
impls = sorted({k for t in torch for k in t["impls"]})
unavailable = {k: v for t in torch for k, v in t.get("unavailable", {}).items()}
best = [min(t["impls"].values()) for t in torch]
ratio = [b / o["ms_step"] for o, b in zip(ours, best)]
print()
print("AdamW step, %d fp32 parameters, 2 threads: medians over %d rounds (GB/s at 28 B/parameter;"
      " triad as STREAM counts it, 12 B/element, measured by bench_adamw in the same rounds)" % (n, len(ours)))
hdr = ["impl", "ms/step", "Mparam/s", "GB/s", "ours speed-up"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
o_ms = med([o["ms_step"] for o in ours])
print("| ours (trident adamw) | %.1f | %.0f | %.2f | - |" % (o_ms, n / o_ms * 1e-3, gb / o_ms * 1e3))
for k in impls:
    ms = [t["impls"][k] for t in torch if k in t["impls"]]
    pair = [t["impls"][k] / o["ms_step"] for o, t in zip(ours, torch) if k in t["impls"]]
    print("| torch AdamW %s | %.1f | %.0f | %.2f | %.2fx |" % (k, med(ms), n / med(ms) * 1e-3, gb / med(ms) * 1e3, med(pair)))
wins = {}
for t in torch:
    wins[t["best"]] = wins.get(t["best"], 0) + 1
print("| STREAM triad | - | - | %.2f | - |" % med([o["triad_gbps"] for o in ours]))
print()
print("ours / fastest torch (per round): %.2fx (bar >= 3x); fastest torch: %s" %
      (med(ratio), ", ".join("%s in %d rounds" % kv for kv in sorted(wins.items()))))
frac = med([o["frac_triad"] for o in ours])
print("ours GB/s / STREAM triad GB/s: %.3f (bar >= 0.80, goal >= 0.90); counting the triad's real traffic"
      " (16 B/element with the write-allocate) instead: %.3f" % (frac, frac * 12 / 16))
if unavailable:
    print("torch implementations not available: " + "; ".join("%s (%s)" % kv for kv in sorted(unavailable.items())))
print("max relative error of ours against the update in double: %.2e" % max(o["err"] for o in ours))
EOF
