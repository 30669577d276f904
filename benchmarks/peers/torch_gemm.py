#!/usr/bin/python3
"""P2 / P2b peer: torch.matmul GFLOP/s, fp32 and bf16, row-major square matrices.

Run with Debian's /usr/bin/python3 (python3-torch 1.13: OpenBLAS for fp32, oneDNN with AMX
for bf16) and, as docs/BENCHMARKS.md asks, OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE.
Prints one JSON line: {"bench": "torch_gemm", "threads": t, "results": [{"n": .., "torch_fp32":
GFLOP/s, "torch_bf16": GFLOP/s}, ...]}, medians over the rounds.

    torch_gemm.py [--sizes 256,512,1024,2048] [--rounds 5] [--min-seconds 0.25] [--threads 2]
"""
import argparse
import json
import os
import statistics
import time

import torch


def time_per_call(fn, min_seconds):
    fn()  # warm up (oneDNN primitive creation, thread pool)
    reps = 0
    t0 = time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and reps >= 2:
            return elapsed / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="256,512,1024,2048")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        a = torch.rand(n, n) * 2 - 1
        b = torch.rand(n, n) * 2 - 1
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        out32 = torch.empty(n, n)
        out16 = torch.empty(n, n, dtype=torch.bfloat16)
        flops = 2.0 * n * n * n
        g32, g16 = [], []
        with torch.no_grad():
            for _ in range(args.rounds):
                g32.append(flops / time_per_call(lambda: torch.matmul(a, b, out=out32), args.min_seconds) * 1e-9)
                g16.append(flops / time_per_call(lambda: torch.matmul(a16, b16, out=out16), args.min_seconds) * 1e-9)
        results.append({"n": n, "torch_fp32": round(statistics.median(g32), 2),
                        "torch_bf16": round(statistics.median(g16), 2)})
    print(json.dumps({"bench": "torch_gemm", "threads": args.threads, "torch": torch.__version__,
                      "results": results}))


if __name__ == "__main__":
    main()
