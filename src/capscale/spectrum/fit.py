"""Power-law fits of rank against width: log R = β log D + c (the paper's method)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PowerLawFit:
    """OLS fit of ``log value = beta * log width + intercept`` (natural logs)."""

    beta: float
    intercept: float
    ci_low: float
    ci_high: float
    r2: float
    n: int
    stderr: float
    confidence: float
    method: str

    def predict(self, width):
        return np.exp(self.intercept) * np.asarray(width, dtype=np.float64) ** self.beta

    def to_dict(self) -> dict:
        return asdict(self)


def _log_points(widths, values) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(widths, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if w.size != v.size:
        raise ValueError(f"{w.size} widths for {v.size} values")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(v))):
        raise ValueError("widths and values must be finite (no NaN/Inf)")
    if np.any(w <= 0) or np.any(v <= 0):
        raise ValueError("a power-law fit needs positive widths and values (it fits in log space)")
    distinct = np.unique(w).size
    if distinct < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct widths, got {distinct}")
    return np.log(w), np.log(v)


def fit_power_law(widths, values, confidence: float = 0.95) -> PowerLawFit:
    """β by OLS on (log width, log value) with a t-interval, as ``scipy.stats.linregress``.

    Repeated widths (replicates) enter as separate points. The interval is
    ``β ± t_{(1+confidence)/2, n-2} · stderr``, the paper's ``ci_method``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = _log_points(widths, values)
    res = stats.linregress(x, y)
    n = x.size
    half = stats.t.ppf(0.5 + confidence / 2, n - 2) * res.stderr if n > 2 else math.inf
    return PowerLawFit(
        beta=float(res.slope),
        intercept=float(res.intercept),
        ci_low=float(res.slope - half),
        ci_high=float(res.slope + half),
        r2=float(res.rvalue**2),
        n=int(n),
        stderr=float(res.stderr),
        confidence=confidence,
        method="ols_t_interval",
    )


def bootstrap_power_law(
    widths,
    values,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    aggregate: str = "median",
    seed: int | None = 0,
) -> PowerLawFit:
    """β with a bootstrap interval over replicate values (layers, seeds) per width.

    Replicates are resampled within each width (stratified), aggregated per width
    (``median`` as the paper, or ``mean``), and refit; the point estimate is the
    fit of the aggregated data, the interval the bootstrap percentile interval.
    Needs ≥ 3 distinct widths and at least one width with ≥ 2 replicates.
    """
    agg = {"median": np.median, "mean": np.mean}.get(aggregate)
    if agg is None:
        raise ValueError(f"aggregate must be 'median' or 'mean', got {aggregate!r}")
    x, y = _log_points(widths, values)
    levels = np.unique(x)
    groups = [np.exp(y[x == lv]) for lv in levels]
    if max(g.size for g in groups) < 2:
        raise ValueError("bootstrap needs replicate values (>= 2 at some width); use fit_power_law")

    xc = levels - levels.mean()

    def beta_of(*samples, axis=-1):
        agg_y = np.log(np.stack([agg(s, axis=axis) for s in samples], axis=-1))
        return (agg_y * xc).sum(-1) / (xc**2).sum()  # the OLS slope, per resample

    point = fit_power_law(np.exp(levels), [agg(g) for g in groups], confidence)
    res = stats.bootstrap(
        groups,
        beta_of,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return PowerLawFit(
        beta=point.beta,
        intercept=point.intercept,
        ci_low=float(res.confidence_interval.low),
        ci_high=float(res.confidence_interval.high),
        r2=point.r2,
        n=int(x.size),
        stderr=float(res.standard_error),
        confidence=confidence,
        method=f"bootstrap_percentile_{aggregate}",
    )
