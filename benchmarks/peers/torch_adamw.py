#!/usr/bin/python3
"""P3 peer: one torch.optim.AdamW step (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01)
over 64Mi float32 parameters (in --tensors tensors, one by default), in each implementation this torch offers on CPU:

  single   foreach=False (the per-tensor loop: a chain of in-place ops per tensor)
  foreach  foreach=True (torch._foreach_* ops over the parameter list)
  fused    fused=True, where the installed torch accepts it for CPU tensors (1.13 does not:
           its AdamW has no `fused` argument; reported as unavailable)

Run with Debian's /usr/bin/python3 and, as docs/BENCHMARKS.md asks,
OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE. Each round times every implementation
(median ms of the steps made in --min-seconds); prints one JSON line with the medians over the
rounds: {"bench": "torch_adamw", "threads": t, "params": n, "impls": {"single": ms, ...},
"best": name, "best_ms": ms, "unavailable": {...}}.

    torch_adamw.py [--elements 67108864] [--tensors 1] [--rounds 5] [--min-seconds 1] [--threads 2]
"""
import argparse
import json
import os
import statistics

import torch

from timing import median_seconds_per_call  # benchmarks/peers/timing.py

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def make(kind, n, tensors):
    # `tensors` parameters of n / tensors elements per implementation, as bench_adamw's store;
    # their gradients stay fixed, as in bench_adamw.
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.rand(n // tensors, generator=gen) * 2 - 1)
        p.grad = torch.rand(n // tensors, generator=gen) * 2 - 1
        params.append(p)
    kwargs = {"fused": True} if kind == "fused" else {"foreach": kind == "foreach"}
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kwargs)
    opt.step()  # creates exp_avg / exp_avg_sq (and raises here if the kind is unsupported)
    return opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=64 << 20)
    ap.add_argument("--tensors", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--impls", default="single,foreach,fused")
    args = ap.parse_args()
    if args.elements <= 0 or args.tensors <= 0 or args.elements % args.tensors:
        ap.error("--elements must be a positive multiple of --tensors")
    torch.set_num_threads(args.threads)
    opts, unavailable = {}, {}
    for kind in args.impls.split(","):
        try:
            opts[kind] = make(kind, args.elements, args.tensors)
        except (TypeError, RuntimeError, ValueError) as e:
            unavailable[kind] = str(e).splitlines()[0]
    times = {k: [] for k in opts}
    with torch.no_grad():
        for _ in range(args.rounds):
            for kind, opt in opts.items():
                times[kind].append(median_seconds_per_call(opt.step, args.min_seconds) * 1e3)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    best = min(med, key=med.get)
    print(json.dumps({"bench": "torch_adamw", "threads": args.threads, "torch": torch.__version__,
                      "params": args.elements, "impls": med, "best": best, "best_ms": med[best],
                      "unavailable": unavailable}))


if __name__ == "__main__":
    main()
