#!/usr/bin/python3
"""P7 peer: inference of nn.Linear(1024, 1024) with bias, batch 256, in PyTorch:

  fp32   the float32 module under torch.inference_mode()
  int8   torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8) with
         torch.backends.quantized.engine = "onednn" (Debian's torch 1.13 has qnnpack and onednn;
         onednn is the fast one on x86): int8 weights per tensor, the input quantized
         dynamically per call (uint8, per tensor), the bias added in the epilogue

Run with Debian's /usr/bin/python3 (python3-torch 1.13) and, as docs/BENCHMARKS.md asks,
OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE. Before timing, the int8 output is compared
with the fp32 output (relative 2-norm error, printed in the JSON). Each round times fp32 then
int8 (median of the calls made in --min-seconds); prints one JSON line with the medians over
the rounds of GOP/s at 2 * batch * in * out operations per call:
{"bench": "torch_qlinear", "threads": t, "batch": b, "fp32": GOP/s, "int8": GOP/s, "err_int8": e}.

    torch_qlinear.py [--batch 256] [--in 1024] [--out 1024] [--rounds 5] [--min-seconds 1] [--threads 2]
"""
import argparse
import json
import os
import statistics

import torch
from torch import nn

from timing import median_seconds_per_call  # benchmarks/peers/timing.py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--in", dest="in_features", type=int, default=1024)
    ap.add_argument("--out", dest="out_features", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "onednn"
    torch.manual_seed(1234)
    # quantize_dynamic swaps the children of a module, not the module itself: wrap the Linear.
    fp32 = nn.Sequential(nn.Linear(args.in_features, args.out_features)).eval()
    int8 = torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)
    assert type(int8[0]).__name__ == "Linear" and "quantized" in type(int8[0]).__module__, type(int8[0])
    x = torch.randn(args.batch, args.in_features)
    with torch.inference_mode():
        y32 = fp32(x)
        y8 = int8(x)
        err = float((y8 - y32).norm() / y32.norm())
        assert err < 5e-2, "torch_qlinear: int8 output too far from fp32 (%.3e)" % err
        calls = {"fp32": lambda: fp32(x), "int8": lambda: int8(x)}
        ops = 2.0 * args.batch * args.in_features * args.out_features
        gops = {k: [] for k in calls}
        for _ in range(args.rounds):
            for k, fn in calls.items():
                gops[k].append(ops / median_seconds_per_call(fn, args.min_seconds) * 1e-9)
    out = {"bench": "torch_qlinear", "threads": args.threads, "torch": torch.__version__, "engine": "onednn",
           "batch": args.batch, "in": args.in_features, "out": args.out_features}
    out.update({k: round(statistics.median(v), 1) for k, v in gops.items()})
    out["err_int8"] = float("%.3e" % err)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
