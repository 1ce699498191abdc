"""capscale in a nanoGPT-style training script: four added lines (marked ``# capscale``).

The model is nanoGPT's (``transformer.h[i].mlp.c_fc`` / ``c_proj``: capscale finds
the FFN sites by these names); the loop is nanoGPT's ``train.py`` in miniature:
token ids in a ``train.bin`` / ``val.bin`` memmap, gradient accumulation, a cosine
learning rate, an evaluation every ``eval_interval`` iterations.

    python examples/nanogpt_style.py --out runs/nanogpt/adamw_w512
    python examples/nanogpt_style.py --out /tmp/nanogpt --toy      # seconds: what the tests run
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import capscale
from capscale.spectrum import FrequencyTable


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd), n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd, ffn_width):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(n_embd, ffn_width), nn.GELU(), nn.Linear(ffn_width, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, ffn_width):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.mlp = nn.LayerNorm(n_embd), MLP(n_embd, ffn_width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, ffn_width):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList(Block(n_embd, n_head, ffn_width) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def prepare(data_dir: Path, n_words: int) -> None:
    """nanoGPT's prepare.py, locally: a written text as uint16 token ids (bytes here)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("aeioustrnlm") for _ in range(rng.randint(1, 6))) for _ in range(500)]
    text = " ".join(rng.choices(words, weights=[1 / (i + 1) for i in range(500)], k=n_words)).encode()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    cut = int(0.9 * len(ids))
    ids[:cut].tofile(data_dir / "train.bin")
    ids[cut:].tofile(data_dir / "val.bin")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/nanogpt/adamw_w512"))
    p.add_argument("--toy", action="store_true", help="toy size: seconds on a CPU (as the tests run it)")
    a = p.parse_args(argv)
    if a.toy:
        n_layer, n_head, n_embd, ffn_width, block_size, batch_size, accum, max_iters, eval_interval = (
            2,
            2,
            16,
            64,
            32,
            4,
            2,
            6,
            3,
        )
        eval_iters, n_words, measure_every = 2, 5000, 2
    else:
        n_layer, n_head, n_embd, ffn_width, block_size, batch_size, accum, max_iters, eval_interval = (
            4,
            4,
            128,
            512,
            128,
            16,
            4,
            500,
            100,
        )
        eval_iters, n_words, measure_every = 20, 400_000, 50
    learning_rate, min_lr, warmup_iters = 1e-3, 1e-4, max_iters // 10
    data_dir = a.out.parent / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    prepare(data_dir, n_words)

    def get_batch(split):
        data = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            out[split] = float(np.mean([model(*get_batch(split))[1].item() for _ in range(eval_iters)]))
        model.train()
        return out

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        ratio = (it - warmup_iters) / max(1, max_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    torch.manual_seed(1337)
    model = GPT(256, block_size, n_layer, n_head, n_embd, ffn_width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    train_ids = torch.from_numpy(np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64))
    freq = FrequencyTable.from_token_ids([train_ids], vocab_size=256)  # capscale: HEAD/MID/TAIL buckets
    probe = capscale.attach(  # capscale
        model,
        every=measure_every,
        total_steps=max_iters,
        freq_table=freq,
        out=a.out,
        run_config={"optimizer": "adamw", "seed": 1337, "ffn_width": ffn_width, "lr": learning_rate},
    )

    model.train()
    X, Y = get_batch("train")
    for iter_num in range(max_iters):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(iter_num)
        if iter_num % eval_interval == 0 or iter_num == max_iters - 1:
            losses = estimate_loss()  # eval-mode forwards: not measured (mode="train")
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            probe.log(iter_num, val_loss=losses["val"])  # capscale
        for _ in range(accum):
            logits, loss = model(X, Y)
            X, Y = get_batch("train")
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        probe.step()  # capscale: once per optimizer step, after its micro-batches
    probe.close()
    print(f"capscale run directory: {probe.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
