#!/usr/bin/python3
"""P4s / P4l peer: training nanoGPT's model (Karpathy, model.py) written plainly in PyTorch on
one fixed batch of random tokens (vocab 65), as docs/BENCHMARKS.md defines the workloads:

  small (P4s)  block 64,  batch 12, 4 layers, 4 heads, width 128   N =    801,664
  large (P4l)  block 256, batch 8,  6 layers, 6 heads, width 384   N = 10,672,512

The model: token + position embeddings; pre-LN blocks x += attn(ln_1(x)), x += mlp(ln_2(x));
causal self-attention with a fused c_attn Linear(C, 3C) and c_proj Linear(C, C), written as
nanoGPT's fallback (torch 1.13 has no scaled_dot_product_attention): q @ k^T * 1/sqrt(hs),
masked_fill(-inf) above the diagonal, softmax, @ v; MLP Linear(C, 4C), GELU (exact),
Linear(4C, C); final LayerNorm; lm_head tied to the token embedding; biases everywhere
(bias=True; GPT(..., bias=False) leaves them out, as nanoGPT's train.py does), dropout 0;
nanoGPT's init (normal(0, 0.02), c_proj weights normal(0, 0.02/sqrt(2 n_layer)), zero biases,
LayerNorm ones/zeros). N counts the parameters without the position embedding (nanoGPT's
get_num_params()); FLOPs per token are 6 N + 12 L T C.

A step: forward, cross-entropy, backward, clip_grad_norm_(1.0), AdamW(lr 1e-3, betas (0.9, 0.99),
weight decay 0.1 on the 2-D tensors only and 0 on biases and LayerNorms, as nanoGPT's
configure_optimizers), zero_grad(set_to_none=True). AdamW runs with foreach=False, the per-tensor
loop: on torch 1.13's CPU (2 threads) it was as fast as foreach=True for the small shape
(3.9 vs 3.8 ms a step, 5.6 vs 6.4 ms in a second, busier run) and faster for the large one
(46 vs 86 ms, 86 vs 132 ms); --foreach 1 measures the other.

  fp32       float32 throughout
  bf16       the same float32 model with forward and loss under
             torch.autocast("cpu", dtype=torch.bfloat16) (oneDNN, AMX); backward, clipping and
             AdamW as usual on the float32 parameters

Run with Debian's /usr/bin/python3 (python3-torch 1.13) and, as docs/BENCHMARKS.md asks,
OPENBLAS_CORETYPE=SkylakeX OMP_WAIT_POLICY=PASSIVE. Each round times fp32 then bf16 (median of the
steps made in --min-seconds, after warm-up steps); prints one JSON line with the medians over the
rounds of tokens/s (batch * block / seconds per step):
{"bench": "torch_gpt", "shape": s, "threads": t, "torch": v, "batch": b, "block": T, "params": N,
 "mflop_per_token": f, "fp32": tok/s, "bf16": tok/s, "base_rss_mib": m0, "fp32_peak_rss_mib": m1,
 "peak_rss_mib": m2}
Memory is the process's peak resident set (getrusage ru_maxrss), so it includes the interpreter
and torch's libraries: base_rss_mib is the peak after importing torch and before any model,
fp32_peak_rss_mib the peak after the fp32 model's warm-up steps (before the bf16 model exists),
peak_rss_mib the peak over the whole run (both models). The parameter count goes to stderr.

    torch_gpt.py [--shape small|large] [--rounds 5] [--min-seconds 1] [--threads 2] [--foreach 0]
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys

import torch
from torch import nn
from torch.nn import functional as F

from timing import median_seconds_per_call  # benchmarks/peers/timing.py

SHAPES = {
    # name: (block, batch, n_layer, n_head, n_embd, N from docs/BENCHMARKS.md)
    "small": (64, 12, 4, 4, 128, 801_664),
    "large": (256, 8, 6, 6, 384, 10_672_512),
}
VOCAB = 65


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class LayerNormNoBias(nn.Module):
    """nanoGPT's LayerNorm(bias=False): torch 1.13's nn.LayerNorm always has a bias."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


def layer_norm(n, bias):
    return nn.LayerNorm(n) if bias else LayerNormNoBias(n)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block, bias=True):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block, bias=True):
        super().__init__()
        self.ln_1 = layer_norm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, block, bias)
        self.ln_2 = layer_norm(n_embd, bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, n_embd, bias=True):
        """The modules are made, and initialised, in nanoGPT's order, so that under the same
        torch.manual_seed the weights are nanoGPT's."""
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, block, bias) for _ in range(n_layer)])
        self.ln_f = layer_norm(n_embd, bias)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """nanoGPT's get_num_params(): the tied wte/lm_head counted once, wpe left out."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx, targets):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def configure_optimizer(model, foreach):
    """nanoGPT's configure_optimizers: decay the 2-D tensors (matmul weights, embeddings), not
    the biases and LayerNorm parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), foreach=foreach)


def make_step(shape, bf16, foreach, warmup=10):
    block, batch, n_layer, n_head, n_embd, _ = SHAPES[shape]
    torch.manual_seed(1337)
    model = GPT(VOCAB, block, n_layer, n_head, n_embd)
    model.train()
    opt = configure_optimizer(model, foreach)
    seq = torch.randint(0, VOCAB, (batch, block + 1))
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def step():
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, y)
        else:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = step().item()
    for _ in range(warmup):
        last = step().item()
    # The loss must fall on the fixed batch (it starts near ln 65 = 4.17).
    assert last < 0.98 * first, "torch_gpt: the loss did not fall (%.4f -> %.4f)" % (first, last)
    return model, step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--foreach", type=int, choices=(0, 1), default=0, help="AdamW(foreach=...); 0, the loop, is faster here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    block, batch, n_layer, _, n_embd, n_expected = SHAPES[args.shape]
    tokens = batch * block
    base = peak_rss_mib()

    model, fp32_step = make_step(args.shape, False, bool(args.foreach))
    fp32_peak = peak_rss_mib()
    n = model.num_params()
    mflop = (6 * n + 12 * n_layer * block * n_embd) / 1e6
    print("torch_gpt: %s: N = %s parameters without the position embedding (docs/BENCHMARKS.md: %s)%s; %.2f MFLOP/token"
          % (args.shape, f"{n:,}", f"{n_expected:,}", "" if n == n_expected else " MISMATCH", mflop), file=sys.stderr)
    steps = {"fp32": fp32_step, "bf16": make_step(args.shape, True, bool(args.foreach))[1]}

    tps = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            tps[k].append(tokens / median_seconds_per_call(step, args.min_seconds))
    out = {"bench": "torch_gpt", "shape": args.shape, "threads": args.threads, "torch": torch.__version__,
           "batch": batch, "block": block, "params": n, "mflop_per_token": round(mflop, 3),
           "foreach": bool(args.foreach)}
    out.update({k: round(statistics.median(v), 1) for k, v in tps.items()})
    out.update({"base_rss_mib": round(base, 1), "fp32_peak_rss_mib": round(fp32_peak, 1), "peak_rss_mib": round(peak_rss_mib(), 1)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
