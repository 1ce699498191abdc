"""Level differences: how many times one series' rank is another's at the same width.

β compares how ranks *grow* with width; two optimizers can grow alike and still differ
several-fold in how much capacity they realise at every width (the CPU study: Muon's
hard rank is 2.0–2.8× AdamW's, width for width, with equal β). This module measures that
level.

For a pair of series on the same architecture, at each width both have runs at, the
per-width log ratio is ``d_w = mean_seeds log R_a − mean_seeds log R_b``. The ratio
reported is ``exp(mean_w d_w)`` — the geometric mean over widths of the seed-geometric-mean
ratios — with a t-interval over widths: ``mean ± t_{W−1} · sd(d_w) / √W``. The scatter of
``d_w`` holds both the seed noise (each ``d_w`` is a difference of seed means) and any
drift of the ratio with width, so the interval is honest about both; with fewer than 2
shared widths there is none. The final validation loss difference (``a − b``, nats) is
given the same way, per bucket with that bucket's loss.

Each row is oriented so that ``ratio ≥ 1`` (``series`` over ``baseline``).

Pairs are formed within a **cell** (``design``: every factor but the treatment equal) when
the runs carry one, else within an architecture. ``p`` is the t-test of ``mean_w d_w = 0``;
``holm_p`` adjusts it over the family of one bucket × metric (all cells and pairs), and
``resolved_holm`` is ``holm_p < 1 − confidence``: the verdicts read that, never the largest
ratio of many.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from capscale.analysis.power import holm

LEVEL_METRICS = ("soft_rank", "hard_rank")
LEVEL_COLUMNS = [
    "cell",
    "arch",
    "bucket",
    "metric",
    "series",
    "baseline",
    "ratio",
    "ratio_low",
    "ratio_high",
    "ratio_min",
    "ratio_max",
    "every_width",
    "resolved",
    "n_widths",
    "widths",
    "n_seeds",
    "loss_diff",
    "loss_diff_low",
    "loss_diff_high",
    "p",
    "holm_p",
    "resolved_holm",
]


def mean_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of a mean; NaN bounds with fewer than 2 values."""
    values = np.asarray(values, dtype=np.float64)
    m = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return m, m - half, m + half


def welch_log_ratio(log_a, log_b, confidence: float = 0.95) -> tuple[float, float, float]:
    """(ratio, low, high) of exp(mean log_a − mean log_b): a Welch t-interval over replicates (seeds).
    NaN bounds unless each side has ≥ 2 values."""
    a, b = np.asarray(log_a, dtype=np.float64), np.asarray(log_b, dtype=np.float64)
    if not (len(a) and len(b)):
        return math.nan, math.nan, math.nan
    d = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return math.exp(d), math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return math.exp(d), math.exp(d), math.exp(d)
    df = se**4 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    return math.exp(d), math.exp(d - half), math.exp(d + half)


def level_ratios(
    points: pd.DataFrame,
    runs: pd.DataFrame,
    site: str = "post",
    confidence: float = 0.95,
    metrics: tuple[str, ...] = LEVEL_METRICS,
) -> pd.DataFrame:
    """One row per architecture × bucket × metric × pair of series (columns ``LEVEL_COLUMNS``).

    ``points``: the per-run aggregates (``aggregate.aggregate_runs``); ``runs``: the sweep's
    runs table (``series``, ``arch``, ``width``, ``seed``, ``final_val_loss[_bucket]``).
    """
    info = [c for c in ("run_id", "series", "arch", "cell", "width", "seed") if c in runs.columns]
    loss_cols = [c for c in runs.columns if c.startswith("final_val_loss")]
    pts = points[points["site"] == site].merge(runs[info + loss_cols], on="run_id")
    if "cell" not in pts.columns:
        pts["cell"] = pts["arch"]
    rows = []
    for (cell, bucket), group in pts.groupby(["cell", "bucket"], sort=True):
        arch = group["arch"].iloc[0]
        loss_col = "final_val_loss" if bucket == "all" else f"final_val_loss_{bucket}"
        for metric in metrics:
            ok = group[np.isfinite(group[metric]) & (group[metric] > 0)]
            logs = ok.assign(log=np.log(ok[metric])).groupby(["series", "width"])["log"].mean()
            counts = ok.groupby(["series", "width"])["seed"].nunique()
            loss = ok.groupby(["series", "width"])[loss_col].mean() if loss_col in ok.columns else None
            for a, b in itertools.combinations(sorted(ok["series"].unique()), 2):
                row = _pair(logs, counts, loss, a, b, confidence)
                if row is not None:
                    rows.append({"cell": cell, "arch": arch, "bucket": bucket, "metric": metric, **row})
    out = pd.DataFrame(rows, columns=LEVEL_COLUMNS)
    for _, idx in out.groupby(["bucket", "metric"], sort=False).groups.items():
        out.loc[idx, "holm_p"] = holm(out.loc[idx, "p"])
    out["resolved_holm"] = (out["holm_p"] < 1 - confidence).astype(bool)
    return out.sort_values(["cell", "bucket", "metric", "series", "baseline"], ignore_index=True)


def _pair(logs: pd.Series, counts: pd.Series, loss: pd.Series | None, a: str, b: str, confidence: float):
    widths = sorted(set(logs[a].index) & set(logs[b].index))
    if not widths:
        return None
    d = np.array([logs[a][w] - logs[b][w] for w in widths])
    if d.mean() < 0:  # orient: the higher series over the lower
        a, b, d = b, a, -d
    m, lo, hi = mean_interval(d, confidence)
    sd = d.std(ddof=1) if len(d) > 1 else math.nan
    if len(d) > 1 and sd > 0:
        p = float(2 * stats.t.sf(abs(m) / (sd / math.sqrt(len(d))), len(d) - 1))
    else:
        p = math.nan
    row = {
        "series": a,
        "baseline": b,
        "ratio": math.exp(m),
        "ratio_low": math.exp(lo) if math.isfinite(lo) else math.nan,
        "ratio_high": math.exp(hi) if math.isfinite(hi) else math.nan,
        "ratio_min": math.exp(d.min()),
        "ratio_max": math.exp(d.max()),
        "every_width": bool((d > 0).all()),
        "resolved": bool(math.isfinite(lo) and lo > 0),
        "n_widths": len(widths),
        "widths": [int(w) for w in widths],
        "n_seeds": int(min(min(counts[a][w], counts[b][w]) for w in widths)),
        "p": p,
    }
    diff = np.array([loss[a][w] - loss[b][w] for w in widths], dtype=np.float64) if loss is not None else np.array([])
    diff = diff[np.isfinite(diff)]
    row["loss_diff"], row["loss_diff_low"], row["loss_diff_high"] = (
        mean_interval(diff, confidence) if len(diff) else (math.nan, math.nan, math.nan)
    )
    return row
