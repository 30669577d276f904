#!/usr/bin/python3
"""P5 peer: training the MLP 784-1024-1024-10 (Linear, ReLU, Linear, ReLU, Linear,
CrossEntropyLoss), batch 256, SGD(lr 0.01, momentum 0.9) on one fixed synthetic batch, written
plainly in PyTorch: zero_grad(set_to_none=True), forward, loss, backward, step.

  fp32       float32 throughout
  bf16       the same float32 model with forward and loss under
             torch.autocast("cpu", dtype=torch.bfloat16) (oneDNN, AMX), backward and step as usual

Run with Debian's /usr/bin/python3 (python3-torch 1.13) and, as docs/BENCHMARKS.md asks,
OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE. Each round times fp32 then bf16 (median of the
steps made in --min-seconds); prints one JSON line with the medians over the rounds of samples/s:
{"bench": "torch_mlp", "threads": t, "batch": b, "fp32": s/s, "bf16": s/s}.

    torch_mlp.py [--batch 256] [--rounds 5] [--min-seconds 1] [--threads 2]
"""
import argparse
import json
import os
import statistics

import torch
from torch import nn

from timing import median_seconds_per_call  # benchmarks/peers/timing.py


def make_step(batch, bf16):
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 784) * 2 - 1
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    first = step().item()
    for _ in range(20):
        last = step().item()
    # The loss must fall on the fixed batch, as bench_mlp checks for ours.
    assert last < 0.98 * first, "torch_mlp: the loss did not fall (%.4f -> %.4f)" % (first, last)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = {"fp32": make_step(args.batch, False), "bf16": make_step(args.batch, True)}
    sps = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            sps[k].append(args.batch / median_seconds_per_call(step, args.min_seconds))
    out = {"bench": "torch_mlp", "threads": args.threads, "torch": torch.__version__, "batch": args.batch}
    out.update({k: round(statistics.median(v), 1) for k, v in sps.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
