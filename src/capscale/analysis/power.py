"""What a difference's data can and cannot tell: intervals, power, multiplicity, pooling.

- ``welch``: the difference of two means of replicates (seeds) with its Welch t-interval
  and two-sided p-value; no interval with fewer than 2 replicates on a side.
- ``mde``: the minimum detectable difference at a power (default 80%) for a two-sided test
  at level α with that standard error and degrees of freedom: ``(t_{1−α/2} + t_{power})·se``
  (df = inf: normal quantiles, as for a pooled estimate).
- ``mde_holm``: the same at level α/m, m the Holm family's size: the difference one
  comparison needs to be *resolved* under Holm with that power when it is the family's only
  real effect (Holm's first step tests the smallest p-value at α/m). ``mde`` is what it needs
  uncorrected; a Holm verdict needs up to ``mde_holm``.
- ``holm``: Holm's step-down adjusted p-values (family-wise error ≤ α over the family).
- ``pooled``: the fixed-effect (inverse-variance) mean of per-cell differences, with
  Cochran's Q, its p-value and I² (the share of the spread that is heterogeneity).
- ``PAPER_BETA``: the paper's published β (160M, post-activation, all tokens;
  ``main_beta_table.csv``), the reference a Δβ between two optimizers is read against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

POWER = 0.8
# Jha & Reagen, main 160M width sweep (post-activation, all tokens), β per optimizer name.
PAPER_BETA = {
    "hard_rank": {"adamw": 0.2887, "muon": 0.8206, "normuon": 0.7984, "dion": 0.5003},
    "soft_rank": {"adamw": 0.6606, "muon": 0.9581, "normuon": 1.0067, "dion": 0.7444},
}


@dataclass(frozen=True)
class Difference:
    """``diff`` = mean(b) − mean(a) with its interval, p-value, and what the data can tell."""

    diff: float
    low: float
    high: float
    se: float
    df: float
    p: float
    n_a: int
    n_b: int
    mde: float  # minimum detectable |difference| at POWER, two-sided, level 1 − confidence
    excluded_above: float  # every difference above this is excluded (the interval's upper bound)
    excluded_below: float  # every difference below this is excluded
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def mde(se: float, df: float, alpha: float = 0.05, power: float = POWER) -> float:
    if not (math.isfinite(se) and df is not None and not math.isnan(df) and df > 0):
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)


def mde_holm(se: float, df: float, m: int, alpha: float = 0.05, power: float = POWER) -> float:
    """The MDE at α/m: what a lone effect among ``m`` Holm-corrected comparisons needs to be resolved."""
    if not m or m < 1:
        return math.nan
    if se == 0:  # no spread over seeds: as ``welch`` states it, any difference is seen
        return 0.0
    return mde(se, df, alpha / m, power)


def welch(a, b, confidence: float = 0.95) -> Difference:
    """mean(b) − mean(a) over replicates; NaN interval (and a ``note``) below 2 replicates a side."""
    a = np.asarray([x for x in a if math.isfinite(x)], dtype=np.float64)
    b = np.asarray([x for x in b if math.isfinite(x)], dtype=np.float64)
    nan = math.nan
    if not (len(a) and len(b)):
        return Difference(nan, nan, nan, nan, nan, nan, len(a), len(b), nan, nan, nan, "nothing to compare")
    d = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        note = f"one seed ({len(a)} vs {len(b)}): no interval over seeds"
        return Difference(d, nan, nan, nan, nan, nan, len(a), len(b), nan, nan, nan, note)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(d, d, d, 0.0, nan, 0.0 if d else 1.0, len(a), len(b), 0.0, d, d, "no spread over seeds")
    df = se**4 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return from_estimate(d, se, df, confidence, len(a), len(b))


def from_estimate(d: float, se: float, df: float, confidence: float = 0.95, n_a: int = 0, n_b: int = 0) -> Difference:
    """A ``Difference`` from an estimate, its standard error and degrees of freedom (inf: normal)."""
    alpha = 1 - confidence
    q = stats.t.ppf(1 - alpha / 2, df)
    half = q * se
    p = float(2 * stats.t.sf(abs(d) / se, df)) if se > 0 else math.nan
    return Difference(d, d - half, d + half, se, df, p, n_a, n_b, mde(se, df, alpha), d + half, d - half)


def holm(pvalues) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN and is not counted in the family)."""
    p = np.asarray(pvalues, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out.tolist()


def pooled(diffs, ses, confidence: float = 0.95) -> dict:
    """Fixed-effect inverse-variance pooled difference with Cochran's Q and I²."""
    d = np.asarray(diffs, dtype=np.float64)
    s = np.asarray(ses, dtype=np.float64)
    ok = np.isfinite(d) & np.isfinite(s) & (s > 0)
    d, s = d[ok], s[ok]
    if not len(d):
        return {"method": "fixed-effect inverse-variance", "n_cells": 0}
    w = 1 / s**2
    est = float((w * d).sum() / w.sum())
    se = float(1 / math.sqrt(w.sum()))
    q = float((w * (d - est) ** 2).sum())
    k = len(d)
    out = from_estimate(est, se, math.inf, confidence).to_dict()
    out.update(
        method="fixed-effect inverse-variance (normal interval)",
        n_cells=k,
        q=q,
        q_p=float(stats.chi2.sf(q, k - 1)) if k > 1 else math.nan,
        i2=max(0.0, (q - (k - 1)) / q) if k > 1 and q > 0 else 0.0,
    )
    return out


def reference_gap(optimizer_a: str, optimizer_b: str, metric: str = "hard_rank") -> float | None:
    """The paper's β_b − β_a for two optimizer names, or None when either is not in its table (or both are one)."""
    if str(optimizer_a).lower() == str(optimizer_b).lower():
        return None
    table = PAPER_BETA.get(metric, {})
    a, b = table.get(str(optimizer_a).lower()), table.get(str(optimizer_b).lower())
    return None if a is None or b is None else b - a
