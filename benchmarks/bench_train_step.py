"""Our training loop vs a plain-PyTorch loop on the same model, optimizer and batches.

Both run N steps of the same config (telemetry off, so this measures the harness
itself: LR schedule, accumulation, logging, checkpoint bookkeeping, data); the
ratio of their tokens/s is the result (budget >= 0.95). Then each optimizer's
`optimizer.step()` time on the same model, relative to AdamW, measured in this run.

    python benchmarks/bench_train_step.py [--preset cpu] [--steps 30] [--ffn-mult 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from capscale.train.config import resolve
from capscale.train.data import load_data
from capscale.train.loop import train
from capscale.train.model import GPT
from capscale.train.optim import OPTIMIZERS, build_optimizer


def plain_loop(cfg, data, steps: int) -> float:
    """The reference: nanoGPT's loop with nothing else; returns seconds for ``steps`` steps."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model_config())
    opt = build_optimizer(cfg.optimizer.name, model, **cfg.optimizer.params)
    seq, bs = cfg.model_config().seq_len, cfg.train.batch_size
    t0 = time.perf_counter()
    for it in range(steps):
        x, y = data.train_batch(bs, seq, seed=cfg.train.seed, step=it)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def ours(cfg) -> float:
    """capscale's loop: tokens/s over all its steps, as its own metrics.jsonl reports
    (timed from the first step to the last, before the final evaluation and checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", log=lambda _m: None)
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return metrics[-1]["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ffn-mult", type=float, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    over = [
        f"train.steps={args.steps}",
        f"model.ffn_mult={args.ffn_mult}",
        "telemetry.enabled=false",
        f"train.eval_every={10**9}",
        f"train.checkpoint_every={10**9}",
        "train.progress=false",
        f"train.log_every={args.steps}",
    ]
    cfg = resolve(args.preset, overrides=over)
    data = load_data(cfg.data)
    cfg = cfg.with_vocab(data.model_vocab_size)
    tokens = args.steps * cfg.train.batch_size * cfg.model_config().seq_len
    print(
        f"preset {args.preset}: d_model {cfg.model.d_model}, FFN x{args.ffn_mult}, {args.steps} steps "
        f"of {cfg.train.batch_size}x{cfg.model_config().seq_len} tokens, torch threads {torch.get_num_threads()}"
    )
    plain, loop = [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both
        plain.append(tokens / plain_loop(cfg, data, args.steps))
        loop.append(ours(resolve(args.preset, overrides=over)))
    print(f"plain PyTorch loop : {max(plain):9.0f} tokens/s (best of {args.repeats})")
    print(f"capscale loop      : {max(loop):9.0f} tokens/s (best of {args.repeats})")
    print(f"ratio              : {max(loop) / max(plain):.3f}  (budget >= 0.95)")

    model = GPT(cfg.model_config())
    x, y = data.train_batch(cfg.train.batch_size, cfg.model_config().seq_len, seed=0, step=0)
    print("\noptimizer.step() time relative to AdamW (same model and gradients):")
    times = {}
    for name in OPTIMIZERS:
        opt = build_optimizer(name, model)
        _, loss = model(x, y)
        loss.backward()
        for _ in range(2):
            opt.step()  # warm-up (state allocation, Shampoo's first roots)
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
        times[name] = sorted(ts)[len(ts) // 2]
    for name, t in times.items():
        print(f"  {name:<8} {1e3 * t:7.1f} ms   x{t / times['adamw']:.2f}")


if __name__ == "__main__":
    main()
