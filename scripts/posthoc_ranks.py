"""Well-sampled ranks of every finished run of a sweep, and their width exponents.

    python scripts/posthoc_ranks.py SWEEP_DIR --tokens 65536 --out ranks.csv [--betas betas.csv]

For each finished run: its final checkpoint measured post hoc on the first
``--tokens`` tokens of its own validation split, bucketed by its training unigram
table (what ``capscale measure RUN`` does without ``--data``), full batch, float64 states
(float32 products of centred batches, as the probe's default).
Telemetry windows hold a few thousand tokens, so wide FFNs and the rarer buckets
have few samples per dimension; here N/D is as large as asked for. One row per
(run, site, bucket): the median over layers, as the paper aggregates. Runs already
in ``--out`` (same checkpoint step and token count) are not measured again. Then
rank ∝ width^β per (series, site, bucket, metric), fitted as ``capscale fit`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from capscale.analysis import run_keys
from capscale.analysis.design import design_of
from capscale.fitcli import fit_table
from capscale.measure import batches, load_model
from capscale.probe import measure_model


def measure_run(run: Path, tokens: int) -> pd.DataFrame:
    loaded = load_model(run, "cpu")
    ids, table = loaded.held_out(tokens)
    frame = measure_model(
        loaded.model, batches(ids, loaded.context, 8, "cpu"), freq_table=table, step=loaded.step, dtype=torch.float32
    )
    agg = (
        frame.groupby(["site", "bucket"])
        .agg(
            soft_rank=("soft_rank", "median"),
            hard_rank=("hard_rank", "median"),
            n_samples=("n_samples", "first"),
            dim=("dim", "first"),
        )
        .reset_index()
    )
    agg.insert(0, "run", run.name)
    agg.insert(1, "step", loaded.step)
    agg["tokens"] = len(ids)
    agg["samples_per_dim"] = agg.n_samples / agg.dim
    return agg


def series_keys(configs: dict[str, dict]) -> pd.DataFrame:
    """Series, width and seed per run as the report names them: the loader's keys, then the
    design's (series named by the factors that vary, e.g. 'adamw · 140 steps · d_model=32')."""
    _, runs = design_of(run_keys(configs), configs)
    return runs.set_index("run_id")[["series", "width", "seed"]]


def fit_ranks(ranks: pd.DataFrame) -> pd.DataFrame:
    """rank ∝ width^β per (series, site, bucket, metric) over all (run, width) points of ``ranks``."""
    long = ranks.melt(
        id_vars=["series", "site", "bucket", "width"], value_vars=["soft_rank", "hard_rank"], var_name="metric"
    )
    return fit_table(long, x="width", y="value", by=["series", "site", "bucket", "metric"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--betas", type=Path, default=None, help="also write the fits here (CSV)")
    args = ap.parse_args()
    done = pd.read_csv(args.out) if args.out.is_file() else None
    rows, configs = [], {}
    for run in sorted((args.sweep / "runs").iterdir()):
        status_path = run / "status.json"
        status = json.loads(status_path.read_text()) if status_path.is_file() else {}
        if status.get("status") != "done":
            continue
        configs[run.name] = json.loads((run / "config.json").read_text())
        if done is not None:
            old = done[done.run == run.name]
            if len(old) and (old.step == status["step"]).all() and (old.tokens == args.tokens).all():
                rows.append(old)
                continue
        rows.append(measure_run(run, args.tokens))
        print(f"measured {run.name}", flush=True)
    # Series, width and seed as the report names them (from each run's config, not its name).
    runs = series_keys(configs)
    ranks = pd.concat(rows, ignore_index=True).drop(columns=["series", "width", "seed"], errors="ignore")
    ranks = runs.join(ranks.set_index("run"), how="inner").rename_axis("run").reset_index()
    ranks.to_csv(args.out, index=False, float_format="%.6g")
    betas = fit_ranks(ranks)
    if args.betas:
        betas.to_csv(args.betas, index=False, float_format="%.6g")
    print(betas.to_string(index=False))


if __name__ == "__main__":
    main()
