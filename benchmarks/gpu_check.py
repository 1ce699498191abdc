"""GPU check: CUDA accumulation, bf16 activations, and telemetry cost at the ``paper-160m`` shape.

    bash benchmarks/gpu_check.sh            # one CUDA GPU; well under 8 minutes on an H200
    bash benchmarks/gpu_check.sh --toy      # the same checks on the CPU at toy size (seconds)

1. Accumulation on the device: ``StreamingCovariance(device=…)`` (float64 and float32
   states) and ``BucketedCovariance`` on the device against a float64 NumPy reference.
2. 200 training steps of the ``paper-160m`` model (12 × 768, FFN ×4, seq 512, bf16
   autocast, AdamW) on random tokens (nothing is downloaded), one micro-batch of 64
   sequences per step (``--batch``), run three times from the same weights and data:
   no telemetry; telemetry every 200 steps (steps 0 and 199, pre and post sites,
   HEAD/MID/TAIL by a Zipf table) decomposed synchronously; the same with
   ``background=True``. Prints median step times, each measured window's extra time, the
   overhead amortised over 200 steps, and whether the background rows equal the
   synchronous ones (exactly on the CPU; on a GPU to the bf16 run-to-run noise of
   atomics in the backward, reported as the largest relative rank difference).
3. Bounded device memory: a fourth run with ``states="host"`` (float64 states in host
   memory, one D×D float32 GEMM buffer on the device). Prints ``probe.memory()`` per
   device and kind for the synchronous and host runs, each run's peak allocated device
   memory above the baseline run's, and checks that the host layout's device GEMM buffer
   is ≤ 64 MB (at paper-160m: 3,072² float32 = 37.7 MB; the activation rows it centres,
   one micro-batch in float32, are counted apart) and that its rows equal the
   synchronous ones (relative soft-rank difference ≤ 1e-4 on the CPU, 1e-2 on a GPU).
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import capscale
from capscale.spectrum import BucketedCovariance, FrequencyTable, StreamingCovariance
from capscale.train.config import PRESETS
from capscale.train.model import GPT, GPTConfig


def check_accumulation(device: torch.device, d: int) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x += 3.0  # a far-from-zero mean: per-batch centring must keep the precision
    b = torch.randint(0, 3, (4096,), generator=g)
    ref = np.cov(x.numpy(), rowvar=False)
    ok = True
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-5)):
        acc = StreamingCovariance(d, device=device, dtype=dtype)
        for chunk in x.to(device).split(512):
            acc.update(chunk.to(torch.float32) if dtype == "float32" else chunk)
        xr = x.to(torch.float32).double().numpy() if dtype == "float32" else x.numpy()
        err = np.abs(acc.covariance().cpu().numpy() - np.cov(xr, rowvar=False)).max() / np.abs(ref).max()
        print(f"  StreamingCovariance on {device}, {dtype} state: max rel error {err:.2e} (tol {tol:g})")
        ok &= err < tol
    host, dev = BucketedCovariance(d), BucketedCovariance(d, device=device)
    for xs, bs in zip(x.split(512), b.split(512)):
        host.update(xs.numpy(), bs.numpy())
        dev.update(xs.to(device), bs.to(device))
    err = max(
        np.abs(a.covariance() - bb.covariance().cpu().numpy()).max() / np.abs(a.covariance()).max()
        for a, bb in zip(host.buckets, dev.buckets)
    )
    print(f"  BucketedCovariance on {device} vs host: max rel error {err:.2e} (tol 1e-10)")
    return ok and err < 1e-10


def train_run(cfg: GPTConfig, device, steps: int, batch: int, mode: str, bf16: bool, table) -> tuple[list, object]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator(device=device).manual_seed(1)
    probe = None
    if mode != "baseline":
        probe = capscale.attach(
            model,
            every=200,
            total_steps=steps,
            freq_table=table,
            background=mode == "background",
            states="host" if mode == "host" else "device",
        )
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g, device=device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if probe is not None:
            probe.step()
        sync()
        times.append(time.perf_counter() - t0)
    df, memory = None, {}
    if probe is not None:
        t0 = time.perf_counter()
        df = probe.compute()  # waits for background work: its time counts
        memory = probe.memory(detail=True)
        probe.close()
        times[-1] += time.perf_counter() - t0
    if device.type == "cuda":
        memory["peak"] = torch.cuda.max_memory_allocated(device)
    return times, (df, memory)


def check_bounded(runs: dict, device: torch.device, width: int) -> bool:
    """The host layout: its device GEMM buffer ≤ 64 MB, its rows equal the device layout's."""
    print("probe.memory() in MB (device kind: bytes), and peak allocated above the baseline run:")
    base_peak = runs["baseline"][1][1].get("peak")
    for mode in ("sync", "host"):
        memory = runs[mode][1][1]
        held = ", ".join(
            f"{d} {kind} {n / 1e6:.1f}" for (d, kind), n in sorted(k for k in memory.items() if k[0] != "peak")
        )
        peak = "" if base_peak is None else f"; peak +{(memory['peak'] - base_peak) / 1e6:.1f} MB"
        print(f"  {mode:<6} {held}{peak}")
    memory = runs["host"][1][1]
    dev = str(torch.empty(0, device=device).device)
    gemm = memory.get((dev, "gemm"), 0)
    states_on_device = memory.get((dev, "states"), 0) if device.type != "cpu" else 0
    a, h = runs["sync"][1][0], runs["host"][1][0]
    rel = float(np.nanmax(np.abs(a.soft_rank - h.soft_rank) / a.soft_rank))
    tol = 1e-4 if device.type == "cpu" else 1e-2
    ok = gemm == width * width * 4 and gemm <= 64 * 2**20 and states_on_device == 0 and rel <= tol
    print(
        f"bounded (states='host'): device GEMM buffer {gemm / 1e6:.1f} MB (<= 64 MB: {gemm <= 64 * 2**20}), "
        f"float64 states on the device: {states_on_device}, rows vs sync max relative soft-rank difference "
        f"{rel:.2e} (tol {tol:g}): {'ok' if ok else 'FAILED'}"
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="CPU, toy model, few steps: a smoke test of this script")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; toy 6)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 64; toy 2)")
    args = ap.parse_args()
    if args.toy:
        device, bf16 = torch.device("cpu"), False  # bf16 matmul on a CPU is ~100x slower
        cfg = GPTConfig(vocab_size=512, seq_len=32, n_layer=2, n_head=2, d_model=32, ffn_mult=4)
        steps, batch = args.steps or 6, args.batch or 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --toy for the CPU smoke run)", file=sys.stderr)
            return 2
        device, bf16 = torch.device("cuda"), True
        cfg = GPTConfig(**PRESETS["paper-160m"]["model"])
        steps, batch = args.steps or 200, args.batch or 64
    print(f"== gpu_check on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'toy'})")
    ok = check_accumulation(device, 64 if args.toy else 768)
    table = FrequencyTable(np.maximum((1e7 / np.arange(1, cfg.vocab_size + 1)).astype(np.int64), 1))
    print(
        f"== {steps} steps: {cfg.n_layer} x {cfg.d_model}, FFN {cfg.ffn_dim}, seq {cfg.seq_len}, batch {batch}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}; telemetry every=200 (windows at 0 and {steps - 1}), pre+post, buckets"
    )
    modes = ("baseline", "sync", "background", "host")
    runs = {m: train_run(cfg, device, steps, batch, m, bf16, table) for m in modes}
    base = statistics.median(runs["baseline"][0][1:-1])
    print(f"{'mode':<12}{'median ms':>11}{'window ms (0, last)':>22}{'amortised':>11}")
    for mode, (times, _) in runs.items():
        med = statistics.median(times[1:-1])
        extra = [1e3 * (times[k] - med) for k in (0, len(times) - 1)]
        amort = 1 + (sum(times) - len(times) * base) / (len(times) * base)
        print(f"{mode:<12}{1e3 * med:>11.2f}{extra[0]:>11.1f}{extra[1]:>11.1f}{amort:>11.4f}")
    a, b = runs["sync"][1][0], runs["background"][1][0]
    same = a.drop(columns="eigenvalues").equals(b.drop(columns="eigenvalues")) and all(
        np.array_equal(x, y) for x, y in zip(a.eigenvalues, b.eigenvalues)
    )
    rel = float(np.nanmax(np.abs(a.soft_rank - b.soft_rank) / a.soft_rank))
    print(f"background rows identical: {same} (max relative soft-rank difference {rel:.2e}; {len(a)} rows)")
    ok &= same if device.type == "cpu" else rel < 1e-2
    ok &= check_bounded(runs, device, cfg.ffn_dim)
    print("gpu_check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
