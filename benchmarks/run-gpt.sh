#!/usr/bin/env bash
# P4: training nanoGPT's model on random tokens: trident (bench_gpt: fp32 and bf16_mixed) against
# the same model written plainly in PyTorch (peers/torch_gpt.py: fp32, and bf16 autocast), 2
# threads, for the small (P4s) and large (P4l) shapes. ROUNDS rounds of [bench_gpt, torch_gpt.py]
# alternate per shape; the tables give medians over the rounds of tokens/s, GFLOP/s at nanoGPT's
# 6N + 12LTd FLOPs per token, MFU against the FMA ceiling bench_gpt measures in the same round,
# and medians of the per-round ratios. Then the memory of the large shape, fp32, with and without
# activation checkpointing (one process each), next to PyTorch's peak resident memory.
#
#   benchmarks/run-gpt.sh      (env: ROUNDS=5 SHAPES="small large" BUILD_DIR=build-bench)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bench_build bench_gpt

echo "# run-gpt: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $rounds rounds, load $(cut -d' ' -f1-3 /proc/loadavg)"
for shape in ${SHAPES:-small large}; do
  bench_rounds bench_gpt torch_gpt.py --shape "$shape"
  "$torch_python" - "$log/ours.jsonl" "$log/torch.jsonl" <<'PY'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
med = statistics.median
pairs = list(zip(ours, torch))
mflop = ours[0]["mflop_per_token"]
def r(f):
    return med([f(o, t) for o, t in pairs])
print()
print("GPT %s shape, 2 threads: medians over %d rounds (tokens/s; GFLOP/s at %.2f MFLOP/token; MFU against the"
      " FMA ceiling measured in each round, median %.0f GFLOP/s; ratios are medians of per-round ratios)"
      % (ours[0]["shape"], len(pairs), mflop, med([o["ceiling"] for o in ours])))
print("| impl | tokens/s | GFLOP/s | MFU | vs torch fp32 | vs torch bf16 |")
print("|---|---|---|---|---|---|")
rows = [("ours fp32", [o["fp32"] for o in ours], r(lambda o, t: o["fp32"] / t["fp32"]), r(lambda o, t: o["fp32"] / t["bf16"])),
        ("ours bf16_mixed", [o["bf16_mixed"] for o in ours], r(lambda o, t: o["bf16_mixed"] / t["fp32"]),
         r(lambda o, t: o["bf16_mixed"] / t["bf16"])),
        ("torch fp32", [t["fp32"] for t in torch], 1.0, r(lambda o, t: t["fp32"] / t["bf16"])),
        ("torch bf16 autocast", [t["bf16"] for t in torch], r(lambda o, t: t["bf16"] / t["fp32"]), 1.0)]
ceiling = [o["ceiling"] for o in ours]
for name, tps, vf, vb in rows:
    mfu = med([x * mflop * 1e-3 / c for x, c in zip(tps, ceiling)])
    print("| %s | %.0f | %.1f | %.3f | %.3f | %.3f |" % (name, med(tps), med(tps) * mflop * 1e-3, mfu, vf, vb))
print()
print("per-round ours fp32 / torch fp32: " + ", ".join("%.3f" % (o["fp32"] / t["fp32"]) for o, t in pairs))
print("per-round ours bf16_mixed / torch fp32: " + ", ".join("%.3f" % (o["bf16_mixed"] / t["fp32"]) for o, t in pairs))
print("torch peak resident memory (fp32 model, whole process): %.0f MiB" % med([t["fp32_peak_rss_mib"] for t in torch]))
print()
PY
  rm -rf "$log"
done

if [[ " ${SHAPES:-small large} " == *" large "* ]]; then
  for ck in "" --checkpoint; do
    env OMP_NUM_THREADS=$threads OMP_PROC_BIND=true "$build/benchmarks/bench_gpt" --memory --shape large $ck | grep -v '^{'
    echo
  done
fi
