"""Cost of one spectra write late in a long run against the same write early, measured in one run.

Writes ``--windows`` windows of the ``paper-160m`` telemetry shape (12 layers × 2 sites
× 4 buckets = 96 rows, eigenvalue lists of 3,072) through ``RunDir.append_spectra`` —
the path ``capscale train`` and ``ParquetSink`` take — and prints

  window N / window 5   median time of one window's write into a dataset that holds N − 1
                        windows ÷ into one that holds 4, the two timed in alternation
                        (budget ≤ 1.2 at N = 500)

A write adds one part file to the ``spectra.parquet`` dataset, so its cost must not
grow with the run (the whole-file rewrite it replaced grew linearly: 0.10 s at window
1, 0.32 s at window 60). ``--compare-rewrite N`` also times that old rewrite at window
N for contrast. ``--quick``: eigenvalue lists of 256 (about 10 MB on disk instead of 1.2 GB).

    python benchmarks/bench_sinks.py [--windows 500] [--rounds 15] [--quick] [--compare-rewrite 60]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from capscale.atomic import atomic_write_bytes
from capscale.rundir import RunDir

LAYERS, SITES, BUCKETS = 12, ("pre", "post"), ("all", "head", "mid", "tail")
METRICS = (
    "soft_rank",
    "hard_rank",
    "renyi_rank_0_5",
    "renyi_rank_inf",
    "asymmetry",
    "spectral_entropy",
    "early_enrichment",
    "soft_rank_frac_dim",
    "hard_rank_frac_dim",
    "soft_rank_frac_max",
    "hard_rank_frac_max",
    "samples_per_dim",
)


def window(step: int, dim: int, rng: np.random.Generator) -> pd.DataFrame:
    """One window's rows, with the spectra table's columns and a spectrum of ``dim`` per row."""
    rows = []
    for layer in range(LAYERS):
        for site in SITES:
            for bucket in BUCKETS:
                eig = np.sort(rng.gamma(0.5, size=dim))[::-1]
                rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "site": site,
                        "bucket": bucket,
                        "n_samples": 524288,
                        "dim": dim,
                        "max_empirical_rank": dim,
                        "sampling_status": "well_sampled",
                        **{m: float(rng.uniform(1, dim)) for m in METRICS},
                        "eigenvalues": eig,
                    }
                )
    return pd.DataFrame(rows)


def rewrite(path: Path, frames: list[pd.DataFrame]) -> float:
    """The old sink: read nothing (it kept the table in memory) but rewrite every row so far."""
    t0 = time.perf_counter()
    buf = io.BytesIO()
    pd.concat(frames, ignore_index=True).to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue(), fsync=True)
    return time.perf_counter() - t0


def timed_append(run: RunDir, frame: pd.DataFrame) -> float:
    """One window's write; the part it added is removed again, so the dataset keeps its size."""
    before = set(run.spectra_path.iterdir())
    t0 = time.perf_counter()
    run.append_spectra(frame)
    dt = time.perf_counter() - t0
    for p in set(run.spectra_path.iterdir()) - before:
        p.unlink()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=15, help="alternating timed writes into each dataset")
    ap.add_argument("--quick", action="store_true", help="eigenvalue lists of 256 instead of 3,072")
    ap.add_argument("--compare-rewrite", type=int, default=0, metavar="N", help="also time the old rewrite at window N")
    args = ap.parse_args()
    if args.windows < 6:
        raise SystemExit("--windows must be >= 6")
    dim = 256 if args.quick else 3072
    rng = np.random.default_rng(0)
    frames = [window(0, dim, rng) for _ in range(4)]  # made ahead: only the write is timed
    with tempfile.TemporaryDirectory() as tmp:
        early, late = RunDir(Path(tmp) / "early"), RunDir(Path(tmp) / "late")
        for run, n in ((early, 4), (late, args.windows - 1)):
            run.create()
            for w in range(1, n + 1):
                run.append_spectra(frames[w % len(frames)].assign(step=200 * w))
        size = sum(p.stat().st_size for p in late.spectra_path.iterdir()) / 1e6
        n_rows = len(pd.read_parquet(late.spectra_path, columns=["step"]))
        # Window 5 and window N written in alternation, so load and drift hit both alike.
        t5, tn = [], []
        for r in range(args.rounds):
            frame = frames[r % len(frames)]
            t5.append(timed_append(early, frame.assign(step=1000)))
            tn.append(timed_append(late, frame.assign(step=200 * args.windows)))
        rewrite_at = None
        if args.compare_rewrite:
            old = [frames[w % len(frames)].assign(step=200 * w) for w in range(1, args.compare_rewrite + 1)]
            rewrite_at = (rewrite(Path(tmp) / "old5.parquet", old[:5]), rewrite(Path(tmp) / "old.parquet", old))
    a, b = statistics.median(t5), statistics.median(tn)
    print(f"spectra writes: {len(frames[0])} rows a window, eigenvalue lists of {dim}")
    print(f"  dataset at window {args.windows}: {size:.0f} MB, {n_rows} rows, read back whole by pd.read_parquet")
    print(f"  write of window 5 (median of {args.rounds}):   {a * 1e3:8.1f} ms")
    print(f"  write of window {args.windows} (median of {args.rounds}): {b * 1e3:8.1f} ms")
    print(f"  window {args.windows} / window 5: {b / a:.2f}  (budget <= 1.2)")
    if rewrite_at is not None:
        a, b = rewrite_at
        print(f"  old whole-file rewrite: window 5 {a * 1e3:.1f} ms, window {args.compare_rewrite} {b * 1e3:.1f} ms")
        print(f"  old window {args.compare_rewrite} / window 5: {b / a:.2f}")


if __name__ == "__main__":
    main()
