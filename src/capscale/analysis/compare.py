"""Optimizer × architecture: is the optimizer's effect on β larger than the architecture's?

For each metric (β_soft, β_hard; headline site, bucket ``all``) two kinds of spans:

- **optimizer effect** within one architecture: max β − min β across the optimizer
  settings trained on it (needs ≥ 2 settings);
- **architecture effect** within one optimizer setting: max β − min β across the
  architectures it was trained on (needs ≥ 2; only when an architecture axis varies).

The paper's claim "optimizer-induced spectral shifts often exceed the architectural
effects" is then a comparison of the spans. Each span carries the interval of the
difference of its two β (``beta_difference``); the summary calls one effect larger only
when every span of that kind lies above every span of the other, intervals included.

A span compares β fitted over the **same widths**: rank is rarely an exact power law, so
β over ×1…×16 and β over ×1…×4 differ even for one model family, and a span between
them would mix that curvature into the effect. Each comparison refits its series on
the widths all of them share (``widths`` in the row); when fewer than 3 are shared,
the series with the fewest widths is left out until 3 are (``n_compared`` counts the
series kept). The cells keep each series' fit over all its widths.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from capscale.analysis.fits import RESOLVE_RTOL, degenerate
from capscale.spectrum import fit_power_law

MIN_WIDTHS = 3
_METRIC = {"soft": "soft_rank", "hard": "hard_rank"}
EFFECT_COLUMNS = [
    "kind",
    "within",
    "metric",
    "span",
    "span_low",
    "span_high",
    "n_compared",
    "highest",
    "lowest",
    "beta_highest",
    "beta_lowest",
    "widths",
]


def beta_difference(
    a: tuple[float, float, float, int], b: tuple[float, float, float, int], confidence: float = 0.95
) -> tuple[float, float, float]:
    """(β_a − β_b, low, high): the interval of a difference of two independent OLS slopes.

    ``a``, ``b``: (β, ci_low, ci_high, n points) as ``fit_power_law`` reports them at
    ``confidence``; each standard error is recovered from its t-interval (n − 2 degrees of
    freedom) and the difference gets a Welch–Satterthwaite t-interval. NaN bounds when
    either interval is missing (NaN or None: a degenerate fit, or its JSON form).
    """
    if not all(_real(x) for x in (a[0], b[0])):
        return math.nan, math.nan, math.nan
    diff = a[0] - b[0]
    ses, dfs = [], []
    for _, lo, hi, n in (a, b):
        # a missing bound (None from JSON, NaN) or a degenerate fit's n: no interval
        if not (_real(n) and n > 2 and _real(lo) and _real(hi)):
            return diff, math.nan, math.nan
        ses.append((hi - lo) / (2 * stats.t.ppf(0.5 + confidence / 2, n - 2)))
        dfs.append(n - 2)
    se = math.hypot(*ses)
    if se == 0:  # both fits degenerate: a zero-width interval, which ``fits.resolves`` never counts
        return diff, diff, diff
    df = se**4 / sum(s**4 / d for s, d in zip(ses, dfs))
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    return diff, diff - half, diff + half


def _real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def shared_widths(widths: dict[str, set[int]], min_widths: int = MIN_WIDTHS) -> tuple[list[str], list[int]]:
    """The series to compare and the widths they all have: drop the series with the fewest
    widths (ties: the last by name) until ``min_widths`` are shared; ([], []) if two cannot be."""
    keep = sorted(widths, key=lambda s: (-len(widths[s]), s))
    while len(keep) >= 2:
        common = set.intersection(*(widths[s] for s in keep))
        if len(common) >= min_widths:
            return sorted(keep), sorted(common)
        keep.pop()
    return [], []


def optimizer_architecture(
    betas: pd.DataFrame,
    points: pd.DataFrame,
    runs: pd.DataFrame,
    site: str = "post",
    bucket: str = "all",
    confidence: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, effects). ``betas``: ``fits.beta_table`` output; ``points``: the per-run aggregates
    (``aggregate.aggregate_runs``); ``runs``: the sweep's runs table.

    cells: one row per setting × arch with β_soft, β_hard, Δβ and intervals (all widths).
    effects: one row per (kind, within, metric): the span of β refitted on shared widths,
    which series are highest and lowest and their β there, and the widths used.
    """
    sel = betas[(betas["site"] == site) & (betas["bucket"] == bucket)]
    cols = ["setting", "arch", "series"] + [
        f"{m}_{f}" for m in ("soft", "hard", "delta") for f in ("beta", "ci_low", "ci_high", "fittable")
    ]
    cells = sel[cols].sort_values(["setting", "arch"], ignore_index=True)
    pts = points[(points["site"] == site) & (points["bucket"] == bucket)].merge(
        runs[["run_id", "width", "setting", "arch"]], on="run_id"
    )
    rows = []
    for kind, group_col, across_col in (("optimizer", "arch", "setting"), ("architecture", "setting", "arch")):
        for within, group in pts.groupby(group_col, sort=True):
            for metric, column in _METRIC.items():
                ok = group[np.isfinite(group[column]) & (group[column] > 0)]
                widths = {k: set(g["width"]) for k, g in ok.groupby(across_col)}
                keep, common = shared_widths(widths)
                if not keep:
                    continue
                beta, fit = {}, {}
                for k in keep:
                    g = ok[(ok[across_col] == k) & ok["width"].isin(common)]
                    fit[k] = fit_power_law(g["width"], g[column], confidence)
                    beta[k] = fit[k].beta
                hi, lo = max(beta, key=beta.get), min(beta, key=beta.get)
                _, span_low, span_high = beta_difference(_triple(fit[hi]), _triple(fit[lo]), confidence)
                rows.append(
                    {
                        "kind": kind,
                        "within": within,
                        "metric": metric,
                        "span": beta[hi] - beta[lo],
                        "span_low": span_low,
                        "span_high": span_high,
                        "n_compared": len(keep),
                        "highest": hi,
                        "lowest": lo,
                        "beta_highest": beta[hi],
                        "beta_lowest": beta[lo],
                        "widths": [int(w) for w in common],
                    }
                )
    return cells, pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def _triple(fit) -> tuple[float, float, float, int]:
    return fit.beta, fit.ci_low, fit.ci_high, fit.n


def _above(lo_a, hi_a, lo_b, hi_b) -> bool:
    """Interval a lies above interval b, by more than round-off, neither degenerate."""
    if degenerate(lo_a, hi_a) or degenerate(lo_b, hi_b):
        return False
    return lo_a - hi_b > RESOLVE_RTOL * max(1.0, abs(lo_a), abs(hi_b))


def effect_summary(effects: pd.DataFrame) -> pd.DataFrame:
    """Per metric and kind: the median span and the envelope of the spans' intervals; ``larger``
    names the kind whose spans all lie above the other's, intervals included (else None)."""
    rows = []
    for metric in ("soft", "hard"):
        sub = effects[effects["metric"] == metric]
        row: dict = {"metric": metric}
        for kind in ("optimizer", "architecture"):
            k = sub[sub["kind"] == kind]
            row[f"{kind}_span"] = k["span"].median()
            row[f"{kind}_low"] = k["span_low"].min()
            row[f"{kind}_high"] = k["span_high"].max()
        opt, arch = row["optimizer_span"], row["architecture_span"]
        if pd.isna(opt) or pd.isna(arch):
            row["point_larger"], row["larger"] = None, None
        else:
            row["point_larger"] = "optimizer" if opt > arch else "architecture"
            if _above(row["optimizer_low"], row["optimizer_high"], row["architecture_low"], row["architecture_high"]):
                row["larger"] = "optimizer"
            elif _above(row["architecture_low"], row["architecture_high"], row["optimizer_low"], row["optimizer_high"]):
                row["larger"] = "architecture"
            else:
                row["larger"] = None
        rows.append(row)
    return pd.DataFrame(rows)
