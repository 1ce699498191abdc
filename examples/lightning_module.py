"""capscale with Lightning: one callback in ``pl.Trainer(callbacks=[...])``.

The LightningModule calls ``self.model(...)`` in ``training_step`` (Lightning's usual
pattern); the callback finds the model inside it by itself. Measurements go to the
trainer's TensorBoard logger at the measured step (per-layer ranks, rank/width, N/D,
eigenvalue histograms), the training and validation losses into the run directory.

    python examples/lightning_module.py --out runs/lightning/sgd_w128
    python examples/lightning_module.py --out /tmp/lit --toy       # seconds: what the tests run
    tensorboard --logdir runs/lightning/tb                          # capscale/soft_rank/median/post ...
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

import capscale
from capscale.spectrum import FrequencyTable


class MLP(nn.Module):
    def __init__(self, d, width):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, width), nn.Linear(width, d)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)).square())  # ReLU², as the paper's GPT


class LM(nn.Module):
    """A toy LM without attention: embeddings, residual FFN blocks (``blocks.{i}.mlp.c_fc`` / ``c_proj``), a head."""

    def __init__(self, vocab, d, width, layers, seq=256):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(d), "mlp": MLP(d, width)}) for _ in range(layers)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = x + b["mlp"](b["norm"](x))
        return self.head(x)


class LitLM(pl.LightningModule):
    def __init__(self, width: int, d: int = 32, layers: int = 2, lr: float = 0.5):
        super().__init__()
        self.model, self.lr = LM(256, d, width, layers), lr

    def loss(self, ids):
        logits = self.model(ids[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(batch[0])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/lightning/sgd_w128"))
    p.add_argument("--toy", action="store_true", help="toy size: seconds on a CPU (as the tests run it)")
    a = p.parse_args(argv)
    width, seq, steps, every, n_words = (32, 24, 6, 2, 4000) if a.toy else (128, 64, 300, 25, 200_000)
    if a.toy:
        torch.set_num_threads(1)

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5))) for _ in range(200)]
    text = " ".join(rng.choices(words, weights=[1 / (i + 1) for i in range(200)], k=n_words)).encode()
    ids = torch.tensor(list(text), dtype=torch.long)
    rows = ids[: len(ids) // seq * seq].view(-1, seq)
    cut = int(0.9 * len(rows))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows[:cut]), batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows[cut:]), batch_size=8)
    freq = FrequencyTable.from_token_ids([rows[:cut]], vocab_size=256)

    torch.manual_seed(0)
    cb = capscale.LightningCallback(every=every, freq_table=freq, out=a.out, run_config={"optimizer": "sgd", "seed": 0})
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=every,
        callbacks=[cb],
        logger=pl.loggers.TensorBoardLogger(str(a.out.parent / "tb"), name=a.out.name),
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(LitLM(width), train, val)
    df = cb.probe.compute()  # readable after fit
    print(df[df.bucket == "all"].groupby(["step", "site"]).soft_rank.median().unstack())
    print(f"capscale run directory: {cb.probe.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
