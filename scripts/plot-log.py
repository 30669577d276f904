#!/usr/bin/python3
"""Renders training CSV logs (from trident's examples) to a PNG of loss and accuracy curves.

    scripts/plot-log.py run.csv [more.csv ...] -o curves.png

Each CSV has a header; the x axis is the first of 'step', 'epoch' or 'iter' present. Every
column named 'loss' or ending in '_loss' goes on the left panel, columns ending in 'acc' or
'accuracy' on the right one (not 'loss_scale' and the like), one line per file and column,
labelled by file name. Empty or 'nan' cells are skipped.
"""
import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"plot-log: {path} has no rows")
    cols = {k: [] for k in rows[0]}
    for r in rows:
        for k, v in r.items():
            try:
                cols[k].append(float(v))
            except (TypeError, ValueError):
                cols[k].append(float("nan"))
    return cols


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("-o", "--output", default="curves.png")
    args = ap.parse_args()
    logs = [(path, read(path)) for path in args.logs]
    def is_acc(name):
        return name.endswith("acc") or name.endswith("accuracy")
    any_acc = any(is_acc(name) and any(y == y for y in ys) for _, cols in logs for name, ys in cols.items())
    if any_acc:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    else:  # a language model's log: the loss alone, full width
        fig, ax_loss = plt.subplots(1, 1, figsize=(7.5, 4.5))
        ax_acc = None
    for path, cols in logs:
        xname = next((c for c in ("step", "epoch", "iter") if c in cols), None)
        if xname is None:
            sys.exit(f"plot-log: {path} has none of the columns step, epoch, iter")
        label = os.path.splitext(os.path.basename(path))[0]
        for name, ys in cols.items():
            pts = [(x, y) for x, y in zip(cols[xname], ys) if y == y]
            if not pts:
                continue
            xs, vs = zip(*pts)
            if name == "loss" or name.endswith("_loss"):
                ax_loss.plot(xs, vs, label=f"{label}: {name}")
            elif is_acc(name):
                ax_acc.plot(xs, vs, label=f"{label}: {name}")
        ax_loss.set_xlabel(xname)
        if ax_acc is not None:
            ax_acc.set_xlabel(xname)
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    if ax_acc is not None:
        ax_acc.set_ylabel("accuracy")
        ax_acc.legend(fontsize=8)
        ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"plot-log: wrote {args.output}")


if __name__ == "__main__":
    main()
