#!/usr/bin/python3
"""The char_gpt run written in PyTorch, for reference: nanoGPT's shakespeare_char CPU training
(train.py's loop and get_lr, 2000 iterations, block 64, batch 12, 4 layers, 4 heads, width 128,
AdamW 1e-3 -> 1e-4 with 100 warm-up iterations, betas (0.9, 0.99), weight decay 0.1 on 2-D
weights, clipping at 1.0) on the model of torch_gpt.py (nanoGPT's, with biases), and a check of
trident's forward pass against PyTorch's on the same weights.

  torch_char_gpt.py [--seed 1337] [--iters 2000]   train; print the validation loss as
                                                    nanoGPT estimates it (20 random batches)
                                                    and over the whole split
  torch_char_gpt.py --weights model.bin             load weights saved by char_gpt --bias
                                                    --save model.bin and print the loss over
                                                    the whole validation split, which
                                                    char_gpt_fp32 --bias --load model.bin
                                                    --iters 0 prints too

The whole-split loss cuts the validation split into consecutive windows of 64 tokens (every
token predicted once), as char_gpt does. Run with Debian's /usr/bin/python3 and
OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE (docs/BENCHMARKS.md)."""
import argparse
import math
import os
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


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("TRIDENT_TINYSHAKESPEARE",
                                                     os.path.join(here, "../../../shared/data/tinyshakespeare.txt")))
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    vocab, train, val = load_text(a.data)
    model = torch_gpt.GPT(vocab, BLOCK, 4, 4, 128)
    if a.weights:
        w = read_weights(a.weights)
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = "wte.weight" if name == "lm_head.weight" else name
                if src not in w or w[src].shape != p.shape:
                    sys.exit("%s: no tensor %s of shape %s (saved with char_gpt --bias?)" % (a.weights, src, tuple(p.shape)))
                p.copy_(w[src])
        print("whole-split validation loss: %.6f" % whole_split_loss(model, val))
        return

    def batch(d):
        ix = torch.randint(len(d) - BLOCK, (BATCH,))
        return torch.stack([d[i:i + BLOCK] for i in ix]), torch.stack([d[i + 1:i + 1 + BLOCK] for i in ix])

    def estimate(d, k=20):
        model.eval()
        with torch.no_grad():
            loss = sum(model(*batch(d)).item() for _ in range(k)) / k
        model.train()
        return loss

    def lr_at(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=a.iters):
        if it < warmup:
            return lr * it / warmup
        return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (decay - warmup))) * (lr - min_lr)

    opt = torch_gpt.configure_optimizer(model, False)
    t0 = time.time()
    for it in range(a.iters + 1):
        if it % 500 == 0 or it == a.iters:
            print("iter %d: val loss %.4f (20 random batches), %.4f (whole split), %.0f s"
                  % (it, estimate(val), whole_split_loss(model, val), time.time() - t0), flush=True)
        if it == a.iters:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = model(*batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
