"""Telemetry at scale: Lanczos vs eigvalsh, and the bounded-memory ("host") state layout.

    python benchmarks/bench_scale.py                      # both parts, the sizes below
    python benchmarks/bench_scale.py --part lanczos --dims 4096 8192 --decays power-law-1 exponential
    python benchmarks/bench_scale.py --part layout --width 3072 --layers 1 --tokens 1024 --micro 2

(a) ``lanczos``: for synthetic covariances of width D with a given spectrum (in a random
    Hadamard basis: dense, so the probes see no axis-aligned shortcut), the time of
    ``numpy.linalg.eigvalsh`` and of ``lanczos_ranks`` (default settings) on this CPU, and
    Lanczos' relative error on the soft, Rényi ½ and ∞ ranks against the exact ones, with
    the stated standard error of the soft rank. Ratio = Lanczos time / eigvalsh time.
(b) ``layout``: a model with the paper-160m FFN width (3,072; fewer layers on a CPU), pre and
    post, HEAD/MID/TAIL buckets, float32 GEMM: one measured step (micro-batches of
    ``--tokens`` rows) with ``states="device"`` and with ``states="host"``, interleaved,
    median of ``--repeats``; unmeasured steps as the baseline. Prints the probe's bytes
    per kind (``probe.memory(detail=True)``), the measured step's extra time in each
    layout and their ratio, and the per-state figures extrapolated to paper-160m
    (12 layers × 2 sites × 3 bucket states). On a CPU the "device" is host memory and the
    device layout's CPU path differs (float32 partial sums, added every 8 batches), so the
    host layout's own cost is also timed alone: one hand-over (a D×D float32 scatter
    staged and added into the float64 state) against one bucket's scatter GEMM; the
    paper-160m host work per measured step is extrapolated from it. On a GPU see
    benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.linalg import hadamard
from torch import nn

import capscale
from capscale.spectrum import FrequencyTable, renyi_rank, soft_rank
from capscale.spectrum.lanczos import lanczos_ranks, validation_spectrum

DECAYS = ("power-law-1", "exponential", "low-rank+noise")


def covariance(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q diag(lam) Qᵀ`` with Q a Hadamard matrix with shuffled, sign-flipped columns (D a power of 2)."""
    d = lam.size
    rng = np.random.default_rng(seed)
    q = hadamard(d).astype(np.float64)[:, rng.permutation(d)] * rng.choice((-1.0, 1.0), d) / np.sqrt(d)
    return (q * lam) @ q.T


def bench_lanczos(dims: list[int], decays: list[str]) -> list[dict]:
    out = []
    print(
        f"{'D':>6} {'spectrum':>15} {'eigvalsh s':>10} {'lanczos s':>9} {'ratio':>6} "
        f"{'soft err':>9} {'±se':>8} {'R½ err':>9} {'R∞ err':>9}"
    )
    for d in dims:
        for kind in decays:
            lam = validation_spectrum(kind, d)
            c = covariance(lam)
            t0 = time.perf_counter()
            np.linalg.eigvalsh(c)
            t_eig = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = lanczos_ranks(lambda v, c=c: c @ v, d, float(np.trace(c)), float((c * c).sum()))
            t_lz = time.perf_counter() - t0
            exact = soft_rank(lam)
            row = {
                "D": d,
                "spectrum": kind,
                "eigvalsh_s": t_eig,
                "lanczos_s": t_lz,
                "soft_err": got["soft_rank"] / exact - 1,
                "soft_se": got["soft_rank_stderr"] / exact,
                "half_err": got["renyi_rank_0_5"] / renyi_rank(lam, 0.5) - 1,
                "inf_err": got["renyi_rank_inf"] / renyi_rank(lam, np.inf) - 1,
            }
            out.append(row)
            print(
                f"{d:>6} {kind:>15} {t_eig:>10.2f} {t_lz:>9.2f} {t_lz / t_eig:>6.2f} {row['soft_err']:>+9.2e} "
                f"{row['soft_se']:>8.1e} {row['half_err']:>+9.2e} {row['inf_err']:>+9.2e}",
                flush=True,
            )
            del c
    return out


class FFN(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.c_proj(torch.relu(self.c_fc(x)).square())


class Model(nn.Module):
    def __init__(self, vocab: int, d: int, h: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(FFN(d, h) for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return x


def bench_layout(width: int, layers: int, tokens: int, micro: int, repeats: int) -> dict:
    vocab, d_model = 512, 64
    torch.manual_seed(0)
    model = Model(vocab, d_model, width, layers).requires_grad_(False)
    table = FrequencyTable((10_000 / np.arange(1, vocab + 1)).astype(np.int64) + 1)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (1, tokens), generator=g) for _ in range(micro)]

    def step(probe=None) -> float:
        t0 = time.perf_counter()
        for ids in batches:
            model(ids)
        if probe is not None:
            probe.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"baseline": [], "device": [], "host": []}
    memory = {}
    rows = {}
    for _ in range(repeats):
        times["baseline"].append(step())
        for layout in ("device", "host"):
            probe = capscale.attach(
                model, every=1, freq_table=table, dtype="float32", states=layout, spectrum="hard-only", mode="any"
            )
            times[layout].append(step(probe))  # the measured step: accumulation and the window's close
            memory[layout] = probe.memory(detail=True)
            rows[layout] = probe.compute()
            probe.close()
    base = statistics.median(times["baseline"])
    print(
        f"\nlayout: D={width}, {layers} layer(s) × pre/post × 3 bucket states, {micro} micro-batch(es) of "
        f"{tokens} rows, float32 GEMM, hard-only rows (the window's decomposition is not what is compared)"
    )
    print(f"{'layout':>8} {'step s':>8} {'extra s':>8} {'extra / device extra':>21}")
    extra = {k: statistics.median(v) - base for k, v in times.items()}
    for k in ("baseline", "device", "host"):
        ratio = "" if k == "baseline" else f"{extra[k] / extra['device']:>21.2f}"
        print(f"{k:>8} {statistics.median(times[k]):>8.3f} {extra[k]:>8.3f} {ratio}")
    np.testing.assert_allclose(rows["host"]["hard_rank"], rows["device"]["hard_rank"], rtol=1e-5)
    print("\nprobe.memory(detail=True), MB:")
    for layout, det in memory.items():
        print(f"  {layout:>6}: " + ", ".join(f"{dev} {kind} {n / 1e6:.1f}" for (dev, kind), n in sorted(det.items())))
    per_add, per_gemm = handover_seconds(width, tokens // 3, repeats)
    per_state = width * width * 8
    paper_states, paper_micro = 12 * 2 * 3, 16
    print(
        f"\nper state: {per_state / 1e6:.1f} MB float64. One hand-over in the host layout (a D×D float32 scatter "
        f"copied to a staging slot and added into the float64 state): {per_add * 1e3:.1f} ms on this CPU, "
        f"{per_add / per_gemm:.2f}x one bucket's scatter GEMM ({tokens // 3} rows, {per_gemm * 1e3:.1f} ms)"
    )
    print(
        f"paper-160m: device layout {paper_states} states × {per_state / 1e6:.1f} MB = "
        f"{paper_states * per_state / 1e9:.2f} GB on the device (+ one merged 'all' per site while decomposed); "
        f"host layout: one D×D float32 GEMM buffer = {width * width * 4 / 1e6:.1f} MB on the device "
        f"(+ the activation rows); host work per measured step ({paper_micro} micro-batches × {paper_states} "
        f"hand-overs) {paper_states * paper_micro * per_add:.1f} s at this CPU's rate"
    )
    return {"times": times, "memory": memory, "per_add_s": per_add}


def handover_seconds(width: int, rows: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one host-layout hand-over (stage a D×D float32 scatter, add it into the float64
    state) and, for scale, of one scatter GEMM of ``rows`` rows into the same buffer."""
    from capscale.probe.hoststates import HostMoments, HostStage, Transfer
    from capscale.spectrum._torch import scatter_upper_

    stage = HostStage(Transfer())
    acc = HostMoments(width, stage)
    square = torch.zeros(width, width)
    x = torch.randn(rows, width)
    mean = torch.zeros(width)
    hand, gemm = [], []
    for _ in range(max(3, repeats) + 1):
        t0 = time.perf_counter()
        scatter_upper_(square, x)
        t1 = time.perf_counter()
        acc.add(rows, mean, square)
        stage.drain()
        t2 = time.perf_counter()
        gemm.append(t1 - t0)
        hand.append(t2 - t1)
    return statistics.median(hand[1:]), statistics.median(gemm[1:])  # the first pays the page faults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("lanczos", "layout", "all"), default="all")
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--decays", nargs="+", default=list(DECAYS))
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("lanczos", "all"):
        bench_lanczos(args.dims, args.decays)
    if args.part in ("layout", "all"):
        bench_layout(args.width, args.layers, args.tokens, args.micro, args.repeats)


if __name__ == "__main__":
    main()
