"""Matched-loss analysis: same width, same loss, different optimizer or step budget — same geometry?

The paper's question ("AdamW at 12K steps matches Dion 1/16 in perplexity; is its
spectral geometry the same?"), asked of every pair of series automatically.

Runs are compared per series × width, seeds pooled by their median final
validation loss (the last logged ``val_loss``). Two series form a candidate pair
when they share the architecture (their optimizer setting — label or step
budget — differs) and, at a common width, their final validation losses agree
within ``tolerance`` nats. Each pair carries both series' β_soft, β_hard, Δβ (with
t-intervals), their ranks per bucket at that width and their asymmetry, and the
differences β_b − β_a with their intervals (``compare.beta_difference``), and at that
width the ratio of hard and soft ranks R_b / R_a with a Welch interval over seeds
(``levels.welch_log_ratio``; it needs ≥ 2 seeds per series). ``geometry`` is
``"different"`` when the interval of a β difference excludes zero or that of a rank
ratio excludes 1, ``"indistinguishable"`` when all include it, and ``"unknown"`` when
neither can be judged.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from capscale.analysis.compare import beta_difference
from capscale.analysis.levels import welch_log_ratio


def loss_by_width(runs: pd.DataFrame) -> pd.DataFrame:
    """Per series × width: the final validation loss across seeds (median, min, max, n_seeds)."""
    cols = ["series", "setting", "arch", "label", "steps", "width"]
    grouped = runs.groupby(cols, sort=True)["final_val_loss"]
    return grouped.agg(val_loss="median", val_loss_min="min", val_loss_max="max", n_seeds="count").reset_index()


def matched_loss_pairs(
    runs: pd.DataFrame,
    points: pd.DataFrame,
    fits: pd.DataFrame,
    tolerance: float = 0.02,
    site: str = "post",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Pairs of series whose final validation loss agrees within ``tolerance`` at a common width."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 nats, got {tolerance!r}")
    losses = loss_by_width(runs).dropna(subset=["val_loss"])
    ranks = _ranks_by_width(runs, points, site)
    betas = _betas(fits, site)
    per_run = points[(points["site"] == site) & (points["bucket"] == "all")].merge(
        runs[["run_id", "series", "width"]], on="run_id"
    )
    rows = []
    candidates = (
        pair
        for _, same in losses.groupby(["width", "arch"], sort=False)
        for pair in itertools.combinations(same.to_dict("records"), 2)
    )
    for a, b in candidates:  # same width, same architecture; one row per series, so a and b differ in setting
        diff = b["val_loss"] - a["val_loss"]
        if abs(diff) > tolerance:
            continue
        row = {
            "width": int(a["width"]),
            "arch": a["arch"],
            "series_a": a["series"],
            "series_b": b["series"],
            "label_a": a["label"],
            "label_b": b["label"],
            "steps_a": int(a["steps"]),
            "steps_b": int(b["steps"]),
            "val_loss_a": a["val_loss"],
            "val_loss_b": b["val_loss"],
            "loss_diff": diff,
            "n_seeds_a": int(a["n_seeds"]),
            "n_seeds_b": int(b["n_seeds"]),
        }
        for side, s in (("a", a), ("b", b)):
            row.update({f"{k}_{side}": v for k, v in betas.get(s["series"], {}).items()})
            row.update({f"{k}_{side}": v for k, v in ranks.get((s["series"], s["width"]), {}).items()})
        for kind in ("soft", "hard"):
            logs = [
                np.log(per_run[(per_run["series"] == x["series"]) & (per_run["width"] == x["width"])][f"{kind}_rank"])
                for x in (b, a)
            ]
            logs = [v[np.isfinite(v)] for v in logs]
            ratio = welch_log_ratio(*logs, confidence)
            row.update(dict(zip((f"{kind}_ratio", f"{kind}_ratio_low", f"{kind}_ratio_high"), ratio)))
        row["geometry"] = _verdict(row, confidence)
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["width", "series_a", "series_b"], ignore_index=True) if rows else out


def _ranks_by_width(runs: pd.DataFrame, points: pd.DataFrame, site: str) -> dict:
    """(series, width) → seed-median soft/hard rank and rank/D per bucket, and asymmetry (bucket all)."""
    pts = points[points["site"] == site].merge(runs[["run_id", "series", "width"]], on="run_id")
    med = pts.groupby(["series", "width", "bucket"])[["soft_rank", "hard_rank", "soft_frac", "hard_frac"]].median()
    out: dict = {}
    for (series, width, bucket), r in med.iterrows():
        d = out.setdefault((series, width), {})
        for col in med.columns:
            d[f"{col}_{bucket}"] = r[col]
        if bucket == "all":
            # log(R1/R2) of the seed-median ranks: the asymmetry of this width's geometry
            ratio = r["soft_rank"] / r["hard_rank"]
            d["asymmetry"] = math.log(ratio) if ratio > 0 else math.nan
    return out


def _betas(fits: pd.DataFrame, site: str) -> dict:
    """series → β (and t-interval) per metric, for the headline site and bucket ``all``."""
    sel = fits[(fits["site"] == site) & (fits["bucket"] == "all")]
    out: dict = {}
    for r in sel.itertuples():
        name = {"soft_rank": "soft", "hard_rank": "hard", "delta_beta": "delta"}[r.metric]
        out.setdefault(r.series, {}).update(
            {
                f"beta_{name}": r.beta,
                f"beta_{name}_low": r.ci_low,
                f"beta_{name}_high": r.ci_high,
                f"beta_{name}_n": r.n,
            }
        )
    return out


def _verdict(row: dict, confidence: float) -> str:
    """Adds ``{soft,hard}_diff[_low,_high]`` (β_b − β_a) to ``row`` and returns the geometry verdict."""
    judged, different = False, False
    for name in ("soft", "hard"):
        a, b = (tuple(row.get(f"beta_{name}{e}_{s}", math.nan) for e in ("", "_low", "_high", "_n")) for s in "ab")
        diff, lo, hi = beta_difference(b, a, confidence) if not any(pd.isna(v) for v in a + b) else (math.nan,) * 3
        row.update({f"{name}_diff": diff, f"{name}_diff_low": lo, f"{name}_diff_high": hi})
        if math.isfinite(lo) and math.isfinite(hi):
            judged, different = True, different or lo > 0 or hi < 0
        rlo, rhi = row.get(f"{name}_ratio_low", math.nan), row.get(f"{name}_ratio_high", math.nan)
        if math.isfinite(rlo) and math.isfinite(rhi):
            judged, different = True, different or rlo > 1 or rhi < 1
    if not judged:
        return "unknown"
    return "different" if different else "indistinguishable"
