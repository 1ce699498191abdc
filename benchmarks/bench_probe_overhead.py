"""Probe overhead on a training step: baseline vs probe pooled vs probe + HEAD/MID/TAIL buckets.

    python benchmarks/bench_probe_overhead.py            # all cases
    python benchmarks/bench_probe_overhead.py --quick    # fewer repeats
    python benchmarks/bench_probe_overhead.py --gemm-dtype float64   # the GEMM dtype of spectral-telemetry
    python benchmarks/bench_probe_overhead.py --background --threads 1  # + attach(background=True), a
                                                                        # step that leaves a core idle
    python benchmarks/bench_probe_overhead.py --background --host-wait-ms 10  # every step ends waiting,
                                                                        # as a host on its GPU

One process, one model, one fixed set of batches; the modes are run in
interleaved blocks (baseline, bare, pooled, bare-buckets, bare-split, buckets, baseline, ...)
so that load drift on a shared machine hits them alike, and each probe is
attached for its block only (with its defaults: float32 GEMM, float64 states,
records kept). A step is zero_grad + forward + backward + SGD step + probe.step(),
so window-end work (reduction, eigvalsh, records) is inside the timed steps.

Columns: ratio (blocks) = the median over blocks of (probe block time / the
baseline block run just before it), robust to bursts of load from other
processes; floor = 1 + the in-loop floor below. Cadence cases add: ms/window =
the measured step's extra time (its forward, the eigvalsh and the records), median
over blocks; amortised = 1 + ms/window / (every x baseline median step), the
headline figure there, since 199 unmeasured steps carry ±1-2% of load noise that
would swamp a 0.5% effect; unmeasured = median unmeasured probe step / median
baseline step, a check that unmeasured steps cost nothing (their hooks are not
even registered, see tests/test_probe_schedule.py).

Modes: baseline (no probe); pooled; buckets (HEAD/MID/TAIL by a Zipf frequency
table); bare and bare-buckets (BareFloor: the floor of each, measured inside the
same training loop: only the GEMM and the eigvalsh calls, nothing else); bare-split
(the bucketed floor that also splits the rows by bucket: sort, gather, one GEMM per
bucket, which any per-bucket covariance needs, printed as "buckets / split floor"); with
``--background`` also pooled-bg and buckets-bg (``attach(background=True)``: the
window's decomposition on a worker thread; the wait for the last window at the end
of a block is counted in its last step). "product/floor" = a probe block's time
over its bare floor's block of the same repeat, median over repeats (quartiles printed
below the table), the budget's figure (≤ 1.05 pooled, ≤ 1.10 buckets).
``--gemm-dtype`` sets the covariance GEMM dtype of the probe and of the floor alike
(float32 is the probe's default for float32 activations; float64 is what
spectral-telemetry does). After the timings the background rows are checked equal
to the synchronous ones on the same weights and data.

Cases:
  st-cpu      spectral-telemetry's published CPU config (their figures: +31% pooled,
              +95% buckets): d_model 64, FFN 256, 2 layers, seq 64, batch 8, vocab
              2048, fp32, FFN pre-activation (fc1) probed, every step measured,
              10-step windows (every=10, window=10).
  st-cpu-200  the same model at the paper's cadence: one measured step per 200.
  both-sites  the same, every step, pre- and post-activation sites.

For every case it also prints the in-loop floor: the covariance GEMM
(2·N·D² flops per site per forward) at this machine's measured matmul speed
plus one eigvalsh per accumulator per window, as a fraction of the baseline step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import capscale
from capscale.spectrum import FrequencyTable
from capscale.spectrum.covariance import _serial_blas


@dataclass(frozen=True)
class Case:
    name: str
    d_model: int = 64
    ffn: int = 256
    layers: int = 2
    seq: int = 64
    batch: int = 8
    vocab: int = 2048
    every: int = 10
    window: int = 10
    block_steps: int = 20  # steps per interleaved block (a multiple of every)
    sites: tuple = ("pre",)


CASES = (
    Case("st-cpu"),
    Case("st-cpu-200", every=200, window=1, block_steps=200),
    Case("both-sites", sites=("pre", "post")),
)


MODES = ("baseline", "bare", "pooled", "bare-buckets", "bare-split", "buckets")
BG_MODES = ("pooled-bg", "buckets-bg")


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))) ** 2)


class TinyLM(nn.Module):
    """The benchmark model of spectral-telemetry's CPU table (embedding, ReLU² MLP blocks, head)."""

    def __init__(self, c: Case):
        super().__init__()
        self.emb = nn.Embedding(c.vocab, c.d_model)
        self.blocks = nn.ModuleList(Block(c.d_model, c.ffn) for _ in range(c.layers))
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)

    def forward(self, ids, targets):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(x).float()
        return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


class BareFloor:
    """The floor, measured in the loop: a hook doing only the covariance GEMM (uncentred,
    float32, no state, no checks, no grouping) and ``eigs`` eigvalsh per site per window
    (1 pooled; 4 with buckets: all, head, mid, tail).

    ``table`` (the split floor): the rows are first put in HEAD/MID/TAIL order (bucket
    lookup and one stable sort per forward, one gather per site) and each bucket gets its
    own GEMM: the least arithmetic that yields per-bucket covariances at all, which the
    one-GEMM floor does not (it computes only the pooled one)."""

    def __init__(
        self, model: TinyLM, c: Case, eigs: int, dtype: torch.dtype = torch.float32, table=None, eig: str = "torch"
    ):
        self.on, self.eigs, self.dtype, self.table, self.eig = False, eigs, dtype, table, eig
        self.ids = self._split = None
        mods = [(b.fc1, "output") for b in model.blocks] if "pre" in c.sites else []
        mods += [(b.fc2, "input") for b in model.blocks] if "post" in c.sites else []
        k = 1 if table is None else 3
        self.acc = [[torch.zeros(c.ffn, c.ffn, dtype=dtype) for _ in range(k)] for _ in mods]
        self.handles = []
        for j, (m, cap) in enumerate(mods):
            if cap == "output":
                self.handles.append(m.register_forward_hook(lambda mod, a, out, j=j: self._add(j, out)))
            else:
                self.handles.append(m.register_forward_pre_hook(lambda mod, a, j=j: self._add(j, a[0])))

    def _add(self, j, x):
        if self.on:
            x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
            if self.table is None:
                self.acc[j][0].addmm_(x.T, x)
                return
            if self._split is None or self._split[0] is not self.ids:  # once per forward
                b = self.table.bucket(self.ids).reshape(-1).long()
                bounds = [0, *torch.cumsum(torch.bincount(b, minlength=3), 0).tolist()]
                self._split = (self.ids, torch.argsort(b, stable=True), bounds)
            _, order, bounds = self._split
            rows = x.index_select(0, order)
            for acc, a, z in zip(self.acc[j], bounds, bounds[1:]):
                acc.addmm_(rows[a:z].T, rows[a:z])

    def finish(self):
        for accs in self.acc:
            for e in range(self.eigs):  # the "all" spectrum: the buckets' sum
                a = (accs[e] if e < len(accs) else sum(accs)).double()
                if self.eig == "serial":  # the probe's own call: NumPy's LAPACK on one thread
                    with _serial_blas():
                        np.linalg.eigvalsh(a.numpy())
                else:
                    torch.linalg.eigvalsh(a)
            for a in accs:
                a.zero_()

    def close(self):
        for h in self.handles:
            h.remove()


def zipf_table(vocab: int) -> FrequencyTable:
    return FrequencyTable(np.maximum((1e7 / np.arange(1, vocab + 1)).astype(np.int64), 1))


def site_spec(sites):
    spec = {"pre": "blocks.{layer}.fc1", "post": ("blocks.{layer}.fc2", "input")}
    return {s: spec[s] for s in sites}


def run_case(
    c: Case,
    repeats: int,
    seed: int = 0,
    gemm_dtype: str = "float32",
    background: bool = False,
    floor_eig: str = "torch",
    host_wait_ms: float = 0.0,
) -> dict:
    dtype = getattr(torch, gemm_dtype)
    torch.manual_seed(seed)
    model = TinyLM(c)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    data = [
        (
            torch.randint(0, c.vocab, (c.batch, c.seq), generator=g),
            torch.randint(0, c.vocab, (c.batch, c.seq), generator=g),
        )
        for _ in range(c.block_steps)
    ]
    table = zipf_table(c.vocab)

    def block(mode: str) -> list[float]:
        probe = bare = None
        if mode.startswith("bare"):
            split = table if mode == "bare-split" else None
            bare = BareFloor(model, c, eigs=1 if mode == "bare" else 4, dtype=dtype, table=split, eig=floor_eig)
        elif mode != "baseline":
            probe = capscale.attach(
                model,
                sites=site_spec(c.sites),
                every=c.every,
                window=c.window,
                freq_table=table if mode.startswith("buckets") else None,
                dtype=gemm_dtype,
                background=mode.endswith("-bg"),
            )
        times = []
        for k, (ids, tgt) in enumerate(data):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if bare is not None:
                bare.on, bare.ids = k % c.every < c.window, ids
            model(ids, tgt).backward()
            opt.step()
            if probe is not None:
                probe.step()
            if bare is not None and k % c.every == c.window - 1:
                bare.finish()
            if host_wait_ms:  # the host blocks on its device (no core, no GIL), as at a GPU step's sync
                time.sleep(host_wait_ms / 1e3)
            times.append(time.perf_counter() - t0)
        if probe is not None:
            t0 = time.perf_counter()
            probe.wait()  # every window has finished inside the timed steps; background ones are waited for
            times[-1] += time.perf_counter() - t0
            probe.close(flush=False)
        if bare is not None:
            bare.close()
        return times

    modes = MODES + (BG_MODES if background else ())
    for m in modes:  # warm-up: allocator, MKL, first-window paths
        block(m)
    times = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            times[m].append(block(m))
    res = {"case": c.__dict__ | {"sites": list(c.sites)}, "modes": {}}
    base_median = statistics.median(t for b in times["baseline"] for t in b)
    measured = [k for k in range(c.block_steps) if k % c.every < c.window]
    windows = c.block_steps // c.every
    for m in modes:
        blocks = times[m]
        flat = [t for b in blocks for t in b]
        quiet = [t for b in blocks for k, t in enumerate(b) if k not in measured]
        stats = {
            "mean_ms": 1e3 * statistics.fmean(flat),
            "median_ms": 1e3 * statistics.median(flat),
            # each block against the baseline block run just before it; median over blocks
            "ratio_blocks": statistics.median(sum(b) / sum(bb) for b, bb in zip(blocks, times["baseline"])),
        }
        if quiet:  # a cadence case: the measured step's extra cost, amortised over `every` steps
            extra = (
                statistics.median(
                    sum(b[k] for k in measured)
                    - len(measured) * statistics.median(b[k] for k in range(len(b)) if k not in measured)
                    for b in blocks
                )
                / windows
            )
            stats["extra_ms_per_window"] = 1e3 * extra
            stats["ratio_amortised"] = 1 + extra / (c.every * base_median)
            stats["ratio_unmeasured"] = statistics.median(quiet) / base_median
        res["modes"][m] = stats
    for m, bare_mode, key in (
        ("pooled", "bare", "product_over_floor"),
        ("buckets", "bare-buckets", "product_over_floor"),
        ("buckets", "bare-split", "product_over_split_floor"),
        ("pooled-bg", "bare", "product_over_floor"),
        ("buckets-bg", "bare-buckets", "product_over_floor"),
    ):
        if m in res["modes"]:
            # each product block against its floor's block of the same repeat (run a block apart,
            # so load drift cancels better than between two medians); median and quartiles
            per = sorted(sum(p) / sum(f) for p, f in zip(times[m], times[bare_mode]))
            res["modes"][m][key] = statistics.median(per)
            res["modes"][m][key + "_iqr"] = [per[len(per) // 4], per[(3 * len(per)) // 4]]
    res["floor"] = floor(c, base_median, dtype)
    if background:
        res["background_rows_identical"] = background_rows_identical(c, table, gemm_dtype)
    return res


def background_rows_identical(c: Case, table, gemm_dtype: str) -> bool:
    """The same weights and batches measured with and without background=True: equal rows?"""
    frames = []
    for bg in (False, True):
        torch.manual_seed(1)
        model = TinyLM(c)
        g = torch.Generator().manual_seed(1)
        probe = capscale.attach(
            model,
            sites=site_spec(c.sites),
            every=c.every,
            window=c.window,
            freq_table=table,
            dtype=gemm_dtype,
            background=bg,
        )
        with torch.no_grad():
            for _ in range(2 * c.every):
                model(*(torch.randint(0, c.vocab, (c.batch, c.seq), generator=g) for _ in range(2)))
                probe.step()
        frames.append(probe.compute())
        probe.close()
    return frames[0].equals(frames[1])


def _median_time(fn, n: int = 30) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def floor(c: Case, base_step_s: float, dtype: torch.dtype = torch.float32) -> dict:
    """GEMM + eigvalsh floor per step, as a fraction of the baseline step (median)."""
    n = c.batch * c.seq
    x = torch.randn(n, c.ffn, dtype=dtype)
    gemm = _median_time(lambda: torch.mm(x.T, x))
    cov = torch.cov(torch.randn(4 * c.ffn, c.ffn, dtype=torch.float64).T)
    eig = _median_time(lambda: torch.linalg.eigvalsh(cov), n=10)
    sites = len(c.sites) * c.layers
    out = {"gemm_ms": 1e3 * gemm, "eigvalsh_ms": 1e3 * eig}
    for name, accs in (("pooled", 1), ("buckets", 4)):  # from isolated timings
        # every step of a window is measured; windows of c.window steps per c.every steps
        per_step = (c.window / c.every) * sites * gemm + sites * accs * eig / c.every
        out[name] = per_step / base_step_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--case", action="append", choices=[c.name for c in CASES])
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--gemm-dtype", choices=("float32", "float64"), default="float32", help="covariance GEMM dtype")
    ap.add_argument("--background", action="store_true", help="add attach(background=True) modes")
    ap.add_argument(
        "--floor-eig",
        choices=("torch", "serial"),
        default="torch",
        help="the floors' eigvalsh: torch's threaded one, or the probe's own (NumPy, one BLAS thread)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    ap.add_argument("--block-steps", type=int, default=None, help="steps per block of the every-step cases")
    ap.add_argument(
        "--host-wait-ms",
        type=float,
        default=0.0,
        help="end every step (all modes) with this long a sleep: a host thread waiting on an accelerator",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for c in CASES:
        if args.case and c.name not in args.case:
            continue
        reps = args.repeats or ((3 if args.quick else 8) if c.block_steps > 50 else (15 if args.quick else 40))
        if args.block_steps and c.every == c.window:
            c = dataclasses.replace(c, block_steps=args.block_steps)
        r = run_case(
            c,
            reps,
            gemm_dtype=args.gemm_dtype,
            background=args.background,
            floor_eig=args.floor_eig,
            host_wait_ms=args.host_wait_ms,
        )
        results.append(r)
        base = r["modes"]["baseline"]
        print(
            f"\n== {c.name}: d_model {c.d_model}, FFN {c.ffn}, {c.layers} layers, seq {c.seq}, batch {c.batch}, "
            f"sites {','.join(c.sites)}, every={c.every} window={c.window}, {reps} x {c.block_steps} steps/mode, "
            f"GEMM {args.gemm_dtype}, {torch.get_num_threads()} torch threads, floor eigvalsh {args.floor_eig}"
            + (f", host wait {args.host_wait_ms:g} ms per step" if args.host_wait_ms else "")
        )
        cadence = c.every > c.window
        head = f"{'mode':<13}{'mean ms':>9}{'median ms':>11}{'ratio (blocks)':>16}{'product/floor':>15}{'floor':>8}"
        if cadence:
            head += f"{'ms/window':>11}{'amortised':>11}{'unmeasured':>12}"
        print(head)
        for m, v in r["modes"].items():
            fl = f"{1 + r['floor'][m]:.4f}" if m in r["floor"] else ""
            pf = f"{v['product_over_floor']:.4f}" if "product_over_floor" in v else ""
            line = f"{m:<13}{v['mean_ms']:>9.2f}{v['median_ms']:>11.2f}{v['ratio_blocks']:>16.4f}{pf:>15}{fl:>8}"
            if cadence:
                line += f"{v['extra_ms_per_window']:>11.2f}{v['ratio_amortised']:>11.4f}{v['ratio_unmeasured']:>12.4f}"
            print(line)
        print(
            f"   floor = covariance GEMM {r['floor']['gemm_ms']:.3f} ms per site and forward + eigvalsh "
            f"{r['floor']['eigvalsh_ms']:.2f} ms per accumulator and window; baseline median step "
            f"{base['median_ms']:.2f} ms"
        )
        iqr = [
            f"{m} [{v['product_over_floor_iqr'][0]:.3f}, {v['product_over_floor_iqr'][1]:.3f}]"
            for m, v in r["modes"].items()
            if "product_over_floor_iqr" in v
        ]
        print("   product/floor quartiles over repeats: " + ", ".join(iqr))
        if "product_over_split_floor" in r["modes"].get("buckets", {}):
            v = r["modes"]["buckets"]
            q = v["product_over_split_floor_iqr"]
            print(
                f"   buckets / split floor (bucket sort, gather, per-bucket GEMMs): "
                f"{v['product_over_split_floor']:.4f} [{q[0]:.3f}, {q[1]:.3f}]"
            )
        if "background_rows_identical" in r:
            print(f"   background rows identical to synchronous rows: {r['background_rows_identical']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
