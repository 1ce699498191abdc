"""An FFN-width sweep with the Hugging Face ``Trainer``, then capscale's capacity report.

Three FFN widths x two optimizers of a small GPT-2 built from a config (no download),
trained on a text this script writes. The only capscale line in the training code is
the callback; ``capscale report`` then fits rank ~ width^beta per optimizer with intervals.

    python examples/hf_trainer_sweep.py --out runs/hf_sweep          # a few minutes on a CPU
    python examples/hf_trainer_sweep.py --out /tmp/hf_sweep --toy    # seconds: what the tests run
    capscale report runs/hf_sweep                                     # (the script runs it at the end)
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import capscale
from capscale.spectrum import FrequencyTable

WIDTHS = (256, 512, 1024)
OPTIMIZERS = {"adamw_torch": 3e-3, "sgd": 0.3}  # HF optim name -> learning rate


def write_text(path: Path, n_words: int, seed: int = 0) -> Path:
    """A local corpus: words drawn with Zipf-like frequencies, so HEAD/MID/TAIL differ."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    words = rng.choices(vocab, weights=weights, k=n_words)
    path.write_text(" ".join(words) + "\n")
    return path


class Chunks(torch.utils.data.Dataset):
    """Fixed-length chunks of byte ids (the tokenizer: UTF-8 bytes, vocabulary 256)."""

    def __init__(self, ids: torch.Tensor, seq: int):
        self.ids, self.seq = ids, seq

    def __len__(self):
        return len(self.ids) // self.seq

    def __getitem__(self, i):
        x = self.ids[i * self.seq : (i + 1) * self.seq]
        return {"input_ids": x, "labels": x}


def train_one(out: Path, width: int, optim: str, lr: float, train, val, freq, a) -> None:
    torch.manual_seed(a.seed)
    config = transformers.GPT2Config(
        vocab_size=256,
        n_positions=a.seq,
        n_embd=a.d_model,
        n_layer=a.layers,
        n_head=2,
        n_inner=width,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out / "hf" / f"{optim}_w{width}"),
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        per_device_eval_batch_size=a.batch,
        learning_rate=lr,
        optim=optim,
        lr_scheduler_type="constant",
        logging_steps=a.every,
        eval_strategy="steps",
        eval_steps=a.steps,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=a.seed,
    )
    # The one capscale line: spectra every `every` steps, written as a run directory the report reads.
    # The FFN width is not given: capscale measures it (n_inner) from the activations.
    cb = capscale.HFCallback(
        every=a.every,
        freq_table=freq,
        out=out / "runs" / f"{optim}_w{width}",
        run_config={"optimizer": optim, "seed": a.seed},
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[cb])
    trainer.train()
    df = cb.probe.compute(reset=False)  # the spectra stay readable after training
    post = df[(df.site == "post") & (df.bucket == "all") & (df.step == df.step.max())]
    print(f"{optim:>12} width {width:>5}: final soft rank {post.soft_rank.median():7.1f} (median over layers)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/hf_sweep"))
    p.add_argument("--toy", action="store_true", help="toy size: seconds on a CPU (as the tests run it)")
    a = p.parse_args(argv)
    a.seed = 0
    if a.toy:
        a.widths, a.d_model, a.layers, a.seq, a.batch, a.steps, a.every, words = (16, 32, 64), 16, 2, 32, 8, 8, 2, 6000
        torch.set_num_threads(1)
    else:
        a.widths, a.d_model, a.layers, a.seq, a.batch, a.steps, a.every, words = (
            WIDTHS,
            128,
            4,
            128,
            16,
            300,
            25,
            300_000,
        )
    a.out.mkdir(parents=True, exist_ok=True)
    text = write_text(a.out / "corpus.txt", words)
    ids = torch.tensor(list(text.read_bytes()), dtype=torch.long)
    cut = int(0.9 * len(ids))
    train, val = Chunks(ids[:cut], a.seq), Chunks(ids[cut:], a.seq)
    # HEAD/MID/TAIL buckets from the training tokens' frequencies.
    freq = FrequencyTable.from_token_ids([ids[:cut]], vocab_size=256)
    for optim, lr in OPTIMIZERS.items():
        for width in a.widths:
            train_one(a.out, width, optim, lr, train, val, freq, a)
    report = [sys.executable, "-m", "capscale", "report", str(a.out)] + (["--bootstrap", "200"] if a.toy else [])
    return subprocess.call(report)


if __name__ == "__main__":
    sys.exit(main())
