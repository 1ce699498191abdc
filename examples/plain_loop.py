"""Telemetry in a plain PyTorch loop: attach, step, log — and a run directory the report reads.

Any model works: this one names its FFN modules its own way, so the sites are given
as patterns. The text, its byte tokens and the HEAD/MID/TAIL frequency table are made
here; nothing is downloaded.

    python examples/plain_loop.py --out runs/plain/relu_w256
    python examples/plain_loop.py --out /tmp/plain --toy       # seconds: what the tests run
    capscale report runs/plain                                 # after a few runs (widths, optimizers)
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from torch import nn

import capscale
from capscale.spectrum import FrequencyTable


class Block(nn.Module):
    def __init__(self, d: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, d))

    def forward(self, x):
        return x + self.ff(self.norm(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, width: int, layers: int, seq: int):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.layers = nn.ModuleList(Block(d, width) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for block in self.layers:
            x = block(x)
        return self.head(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/plain/relu_w256"))
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--toy", action="store_true", help="toy size: seconds on a CPU (as the tests run it)")
    a = p.parse_args(argv)
    d, layers, seq, batch, steps, every = (16, 2, 32, 8, 6, 2) if a.toy else (64, 4, 64, 32, 400, 50)
    width = 32 if a.toy else a.width

    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(1, 7))) for _ in range(300)]
    text = " ".join(rng.choices(words, weights=[1 / (i + 1) for i in range(300)], k=20_000))
    ids = torch.tensor(list(text.encode()), dtype=torch.long)  # byte tokens
    freq = FrequencyTable.from_token_ids([ids], vocab_size=256)  # HEAD/MID/TAIL by token frequency

    torch.manual_seed(0)
    model = TinyLM(256, d, width, layers, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()  # the probe measures training forwards (mode="train"); from_pretrained returns eval mode

    probe = capscale.attach(
        model,
        sites={"pre": "layers.{layer}.ff.0", "post": ("layers.{layer}.ff.2", "input")},  # FFN in / after ReLU
        every=every,
        total_steps=steps,
        freq_table=freq,
        out=a.out,
        run_config={"optimizer": "adamw", "seed": 0, "ffn_width": width, "lr": 3e-3},
    )
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        probe.step()  # unmeasured steps cost nothing: no hooks run
        probe.log(step + 1, loss=loss.item())
    probe.close()  # status "done": `capscale report` will analyse this run
    df = probe.compute()  # one row per (step, layer, site, bucket): ranks, N/D status, eigenvalues
    last = df[(df.bucket == "all") & (df.step == df.step.max())]
    print(last[["step", "layer", "site", "soft_rank", "hard_rank", "samples_per_dim", "sampling_status"]])
    print(f"run directory: {probe.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
