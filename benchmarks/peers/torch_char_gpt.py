#!/usr/bin/python3
"""The char_gpt run written in PyTorch, for reference. Three modes:

  torch_char_gpt.py [--seed 1337] [--iters 2000] [--bias]
      nanoGPT's shakespeare_char CPU run as its README gives it (train.py config/train_shakespeare_char.py
      --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
      --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0):
      train.py's loop step for step, with its random stream: torch.manual_seed(seed), the model made
      and initialised in model.py's order (bias=False, train.py's default), the first batch drawn
      before the loop and the next one right after each forward, estimate_loss (20 random batches
      of train, then of val) every 250 iterations before the step, get_lr (warm-up
      lr*(it+1)/(warmup+1) over 100 iterations, cosine to 1e-4 at 2000), AdamW (0.9, 0.99) with
      weight decay 0.1 on the 2-D tensors, clip_grad_norm_(1.0). Prints train.py's "step N: train
      loss X, val loss Y" lines; then, of the model at the last of them (the one train.py saves),
      the spread of train.py's 20-batch validation estimate over 100 more draws and the loss over
      the whole validation split.

  torch_char_gpt.py --twin init.bin --twin-log run.csv [--seed 1337] [--bias] [--check TOL]
      the same training as a char_gpt_fp32 run, started from its weights: init.bin from
      `char_gpt_fp32 --iters 0 --save init.bin`, run.csv from `char_gpt_fp32 --csv run.csv` with the
      same --seed (and --bias); the batches are char_gpt's (its Philox batch stream, reimplemented
      here) and each iteration's lr is the one char_gpt logged. Prints the two training losses side
      by side and the whole-split validation loss, which char_gpt prints at the end of its run.

      With --check TOL it exits 1 when one of the losses differs by more than TOL (a CTest,
      example.char_gpt_vs_pytorch, runs scripts/char-gpt-vs-pytorch.sh, which does this).

  torch_char_gpt.py --weights model.bin
      the loss over the whole validation split of weights saved by char_gpt (--save), which
      char_gpt_fp32 --load model.bin --iters 0 prints too (a check of the forward pass).

The whole-split loss cuts the validation split into consecutive windows of 64 tokens (every
token predicted once), as char_gpt does. Run with Debian's /usr/bin/python3 and
OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE (docs/BENCHMARKS.md)."""
import argparse
import math
import os
import statistics
import struct
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt  # noqa: E402  (the model)

BLOCK, BATCH = 64, 12


def load_text(path):
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(len(data) * 0.9)
    return len(chars), data[:n], data[n:]


def read_weights(path):
    """trident's weights file (nn/serialize.hpp): magic, count, (name, rank, extents, fp32)*, hash."""
    b = open(path, "rb").read()
    if b[:8] != b"TRDNTW01":
        sys.exit("%s is not a trident weights file" % path)
    pos = 8
    (count,) = struct.unpack_from("<Q", b, pos)
    pos += 8
    out = {}
    for _ in range(count):
        (length,) = struct.unpack_from("<I", b, pos)
        pos += 4
        name = b[pos:pos + length].decode()
        pos += length
        (rank,) = struct.unpack_from("<I", b, pos)
        pos += 4
        dims = struct.unpack_from("<%dQ" % rank, b, pos)
        pos += 8 * rank
        numel = math.prod(dims)
        out[name] = torch.tensor(struct.unpack_from("<%df" % numel, b, pos)).view(*dims)
        pos += 4 * numel
    return out


def whole_split_loss(model, val):
    model.eval()
    windows = (len(val) - 1) // BLOCK
    x = val[:windows * BLOCK].view(windows, BLOCK)
    y = val[1:windows * BLOCK + 1].view(windows, BLOCK)
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows, 64):
            total += model(x[i:i + 64], y[i:i + 64]).item() * x[i:i + 64].shape[0]
    model.train()
    return total / windows


MASK32 = 0xFFFFFFFF


def philox4x32_10(c, k0, k1):
    """Philox4x32-10 (core/rng.hpp): the 128-bit counter c (4 words) under the key (k0, k1)."""
    c0, c1, c2, c3 = c
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
    return c0, c1, c2, c3


class BatchRng:
    """char_gpt's batch stream (io::batch_rng): value i is half of the Philox block with counter
    (i / 2, "text"), and below(n) rejects the values under 2^64 mod n."""

    TAG = 0x74657874

    def __init__(self, seed):
        self.seed, self.pos = seed, 0

    def next(self):
        b = self.pos // 2
        r = philox4x32_10((b & MASK32, b >> 32, self.TAG, 0), self.seed & MASK32, self.seed >> 32)
        k = 2 * (self.pos % 2)
        self.pos += 1
        return (r[k + 1] << 32) | r[k]

    def below(self, n):
        threshold = (2**64 - n) % n
        while True:
            x = self.next()
            if x >= threshold:
                return x % n


def rows(d, ix):
    return torch.stack([d[i:i + BLOCK] for i in ix]), torch.stack([d[i + 1:i + 1 + BLOCK] for i in ix])


def nanogpt(model, train, val, iters, t0):
    """train.py's loop, in the order it draws from torch's random stream."""
    eval_interval, eval_iters, warmup, lr_max, min_lr = 250, 20, 100, 1e-3, 1e-4

    def get_batch(d):
        return rows(d, torch.randint(len(d) - BLOCK, (BATCH,)))

    @torch.no_grad()
    def mean_loss(d):
        """One of train.py's estimates: the mean loss of eval_iters random batches of d."""
        model.eval()
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            losses[k] = model(*get_batch(d)).item()
        model.train()
        return float(losses.mean())

    def estimate_loss():
        return {"train": mean_loss(train), "val": mean_loss(val)}

    def get_lr(it):
        if it < warmup:
            return lr_max * (it + 1) / (warmup + 1)
        if it > iters:
            return min_lr
        coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (iters - warmup)))
        return min_lr + coeff * (lr_max - min_lr)

    opt = torch_gpt.configure_optimizer(model, False)
    x, y = get_batch(train)
    it = 0
    while True:
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if it % eval_interval == 0:
            losses = estimate_loss()
            print("step %d: train loss %.4f, val loss %.4f (%.0f s)" % (it, losses["train"], losses["val"], time.time() - t0),
                  flush=True)
        # train.py makes one more step after the last estimate, but the checkpoint it saves (the
        # model sample.py loads) and the loss it prints are the model's here
        if it == iters:
            break
        loss = model(x, y)
        x, y = get_batch(train)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        it += 1
    # How far train.py's 20-batch estimate strays from the model's loss: 100 more draws.
    draws = sorted(mean_loss(val) for _ in range(100))
    print("train.py's 20-batch validation estimate, 100 more draws on the saved model: mean %.4f, sd %.4f, "
          "min %.4f, max %.4f" % (statistics.mean(draws), statistics.stdev(draws), draws[0], draws[-1]))


def twin(model, train, seed, log_path):
    """char_gpt's training from the same weights, batches and lrs; returns its per-iteration
    training losses next to char_gpt's."""
    lrs, theirs = [], []
    with open(log_path) as f:
        header = f.readline().strip().split(",")
        col = {name: i for i, name in enumerate(header)}
        for line in f:
            v = line.strip().split(",")
            it, lr, loss = int(float(v[col["iter"]])), float(v[col["lr"]]), v[col["train_loss"]]
            if loss not in ("", "nan"):  # a training row, with the lr of its step
                if it != len(lrs) + 1:
                    sys.exit("%s: iteration %d out of order" % (log_path, it))
                lrs.append(lr)
                theirs.append(float(loss))
    if not lrs:
        sys.exit("%s: no training rows (char_gpt --csv)" % log_path)
    opt = torch_gpt.configure_optimizer(model, False)
    rng, n = BatchRng(seed), len(train) - BLOCK
    ours = []
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(*rows(train, [rng.below(n) for _ in range(BATCH)]))
        ours.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ours, theirs


def load_into(model, path):
    w = read_weights(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = "wte.weight" if name == "lm_head.weight" else name
            if src not in w or w[src].shape != p.shape:
                sys.exit("%s: no tensor %s of shape %s (saved with%s --bias?)"
                         % (path, src, tuple(p.shape), "" if "h.0.ln_1.bias" in dict(model.named_parameters()) else "out"))
            p.copy_(w[src])
        extra = set(w) - {n for n, _ in model.named_parameters()}
        if extra:
            sys.exit("%s: tensors the model does not have: %s" % (path, ", ".join(sorted(extra))))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("TRIDENT_TINYSHAKESPEARE",
                                                     os.path.join(here, "../../../shared/data/tinyshakespeare.txt")))
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bias", action="store_true", help="biases in the Linears and LayerNorms (nanoGPT's bias=True)")
    ap.add_argument("--weights", help="print the whole-split loss of these char_gpt weights")
    ap.add_argument("--twin", help="char_gpt's initial weights (char_gpt_fp32 --iters 0 --save)")
    ap.add_argument("--twin-log", help="char_gpt's CSV log of the run to follow (char_gpt_fp32 --csv)")
    ap.add_argument("--check", type=float, metavar="TOL",
                    help="with --twin: fail (exit 1) when a training loss differs from char_gpt's by more than TOL")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    vocab, train, val = load_text(a.data)
    t0 = time.time()
    if a.weights:
        names = set(read_weights(a.weights))
        model = torch_gpt.GPT(vocab, BLOCK, 4, 4, 128, bias="h.0.ln_1.bias" in names)
        load_into(model, a.weights)
        print("whole-split validation loss: %.6f" % whole_split_loss(model, val))
        return
    model = torch_gpt.GPT(vocab, BLOCK, 4, 4, 128, bias=a.bias)
    if a.twin:
        if not a.twin_log:
            sys.exit("--twin needs --twin-log (char_gpt's --csv of the run)")
        load_into(model, a.twin)
        ours, theirs = twin(model, train, a.seed, a.twin_log)
        print("iterations   mean training loss: PyTorch  char_gpt  largest |difference| of one iteration")
        for lo, hi in ((0, 1), (1, 10), (10, 100), (100, 500), (500, 1000), (1000, 1500), (1500, len(ours))):
            if lo < len(ours):
                hi = min(hi, len(ours))
                m1, m2 = sum(ours[lo:hi]) / (hi - lo), sum(theirs[lo:hi]) / (hi - lo)
                worst = max(abs(u - v) for u, v in zip(ours[lo:hi], theirs[lo:hi]))
                print("%5d-%-5d  %23.6f  %8.6f  %.2e" % (lo + 1, hi, m1, m2, worst))
        if a.check is not None:
            diffs = [abs(u - v) for u, v in zip(ours, theirs)]
            bad = [i for i, d in enumerate(diffs) if not d <= a.check]  # a NaN fails too
            if bad:
                i = bad[0]
                sys.exit("FAILED: char_gpt's training loss differs from PyTorch's by %.3g at iteration %d (%.6f against "
                         "%.6f), more than %g" % (diffs[i], i + 1, theirs[i], ours[i], a.check))
            print("ok: the %d training losses agree within %g (largest difference %.3g)" % (len(ours), a.check, max(diffs)))
            return
    else:
        nanogpt(model, train, val, a.iters, t0)
    print("whole-split validation loss: %.4f (%.0f s)" % (whole_split_loss(model, val), time.time() - t0), flush=True)


if __name__ == "__main__":
    main()
