"""Optimizer step time on a small GPT, relative to our AdamW measured in the same run.

    python benchmarks/bench_optimizers.py                 # d_model 128, 4 layers, FFN ×4
    python benchmarks/bench_optimizers.py --ffn-mult 16   # the CPU study's widest FFN

Gradients come from one forward/backward and are reused, so only ``optimizer.step()``
is timed. Optimizers are timed round-robin (one step each, repeated) so that drift in
a shared machine's load hits them all alike. The mean over a multiple of Shampoo's
``precondition_every`` includes its amortised root computations; the median does not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from capscale.train.model import GPT, GPTConfig
from capscale.train.optim import build_optimizer, optimizer_defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn-mult", type=float, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (use a multiple of 10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cfg = GPTConfig(
        vocab_size=args.vocab,
        seq_len=args.seq,
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.d_model,
        ffn_mult=args.ffn_mult,
    )
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)

    # forward + backward for context (what one optimizer step is a fraction of)
    model = GPT(cfg).to(dev)
    fb = []
    for i in range(args.warmup + 5):
        model.zero_grad()
        sync()
        t = time.perf_counter()
        model(x, x)[1].backward()
        sync()
        if i >= args.warmup:
            fb.append(time.perf_counter() - t)
    fwd_bwd = statistics.median(fb)

    variants = [
        ("adamw", {}),
        ("muon", {}),
        ("normuon", {}),
        ("dion", {"rank_fraction": 0.5}),
        ("dion", {"rank_fraction": 0.25}),
        ("dion", {"rank_fraction": 1 / 16}),
        ("shampoo", {}),
    ]
    runs = []
    for name, hp in variants:
        torch.manual_seed(0)
        m = GPT(cfg).to(dev)
        with torch.no_grad():  # nonzero weights everywhere, so no layer has a zero gradient
            for p in m.parameters():
                p.normal_(0.0, 0.02)
        m(x, x)[1].backward()
        label = name + (f" r={hp['rank_fraction']:g}" if hp else "")
        runs.append((label, m, build_optimizer(name, m, **hp)))
    ref_model = GPT(cfg).to(dev)
    for p, q in zip(ref_model.parameters(), runs[0][1].parameters()):
        p.grad = q.grad.clone()
    roles = ref_model.param_groups()
    torch_adamw = torch.optim.AdamW(
        [
            dict(params=roles["matrix"], weight_decay=0.01),
            dict(params=roles["embed"] + roles["head"], weight_decay=0.0),
        ],
        lr=3e-3,
        betas=(0.9, 0.95),
    )
    runs.append(("torch.optim.AdamW", ref_model, torch_adamw))

    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for i in range(args.warmup + args.steps):
        for label, _, opt in runs:
            sync()
            t = time.perf_counter()
            opt.step()
            sync()
            if i >= args.warmup:
                times[label].append(time.perf_counter() - t)

    n_params = runs[0][1].num_params()
    print(
        f"GPT d_model={args.d_model} layers={args.layers} FFN width={cfg.ffn_dim} "
        f"vocab={args.vocab} ({n_params / 1e6:.2f}M params); batch {args.batch}×{args.seq}; "
        f"device {dev}, {torch.get_num_threads()} threads; {args.steps} timed steps each"
    )
    print(f"forward+backward: {fwd_bwd * 1e3:.1f} ms (median)")
    print(f"shampoo: roots every {optimizer_defaults('shampoo')['precondition_every']} steps")
    base = statistics.fmean(times["adamw"])
    print(f"\n{'optimizer':<20}{'mean ms':>10}{'median ms':>11}{'× adamw':>9}{'% fwd+bwd':>11}")
    for label, ts in times.items():
        mean = statistics.fmean(ts)
        print(
            f"{label:<20}{mean * 1e3:>10.2f}{statistics.median(ts) * 1e3:>11.2f}"
            f"{mean / base:>9.2f}{100 * mean / fwd_bwd:>11.1f}"
        )


if __name__ == "__main__":
    main()
