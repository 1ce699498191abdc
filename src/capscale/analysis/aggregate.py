"""Aggregate per-step, per-layer spectra to one value per run × site × bucket (the paper's rule).

Convention (Jha & Reagen; docs/conventions.md "Scaling fits"): for every layer, the median of
the **last k logged steps** (k = ``last_k``, paper: 5) **within the final part of the run**
(``final_fraction`` f: the records with step ≥ (1 − f) × the run's last logged step), then
the **median over layers**. The fraction makes the rule the same for every run length:
a short run whose last 5 records reach back to step 0 is aggregated from its final
records only, never its first steps. The last k steps are chosen by step number before missing values are
dropped, so an undersampled ("insufficient", NaN) record is skipped, not replaced
by an earlier step; a layer or run whose chosen records are all NaN stays NaN.
Across seeds the spread is reported as median, min, max and the number of seeds.

Every aggregate carries the reliability of the records it used: the worst
``sampling_status`` and the smallest N/D (``samples_per_dim``).
"""

from __future__ import annotations

import pandas as pd

from capscale.spectrum import BUCKETS, SAMPLING_STATUSES
from capscale.spectrum.summary import AGGREGATED_METRICS, REPORT_METRICS, SPECTRUM_METRICS

# The bucket values of spectra.parquet: every token ("all"), then the frequency regimes.
ALL_BUCKETS = ("all", *BUCKETS)

# Scalar metrics aggregated when present in spectra.parquet: those the spectrum metric table marks aggregated.
METRICS = AGGREGATED_METRICS
# Metrics also aggregated as a fraction of D: (metric, fraction column), e.g. ("soft_rank", "soft_frac").
FRACTIONS = tuple((m.name, m.frac) for m in SPECTRUM_METRICS if m.aggregated and m.frac is not None)
# The report's rank columns: each shown metric, then the fractions of D of those that have one.
REPORT_COLUMNS = tuple(m.name for m in REPORT_METRICS) + tuple(m.frac for m in REPORT_METRICS if m.frac)
_KEYS = ["run_id", "site", "bucket"]
_STATUS_ORDER = {s: i for i, s in enumerate(SAMPLING_STATUSES)}


def last_k_per_layer(spectra: pd.DataFrame, last_k: int = 5, final_fraction: float | None = None) -> pd.DataFrame:
    """Per run × site × bucket × layer: the median of each metric over the last k logged steps
    (within the final ``final_fraction`` of each run's logged steps, when given).

    Also ``dim``, ``n_steps`` (records used), ``last_step``, ``worst_status`` and
    ``min_samples_per_dim`` of those records.
    """
    if not isinstance(last_k, int) or isinstance(last_k, bool) or last_k < 1:
        raise ValueError(f"last_k must be a positive int, got {last_k!r}")
    if final_fraction is not None:
        if not 0 < final_fraction <= 1:
            raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")
        last = spectra.groupby("run_id")["step"].transform("max")
        spectra = spectra[spectra["step"] >= (1 - final_fraction) * last]
    metrics = [m for m in METRICS if m in spectra.columns]
    keys = _KEYS + (["stack"] if "stack" in spectra.columns else []) + ["layer"]  # encoder/decoder layer 0 differ
    tail = spectra.sort_values("step", kind="stable").groupby(keys, sort=False).tail(last_k)
    tail = tail.assign(_status=tail["sampling_status"].map(_STATUS_ORDER).fillna(-1))
    grouped = tail.groupby(keys, sort=True)
    out = grouped[metrics].median()  # pandas' median skips NaN: an "insufficient" record is ignored
    out["dim"] = grouped["dim"].max()
    out["n_steps"] = grouped["step"].size()
    out["last_step"] = grouped["step"].max()
    out["worst_status"] = grouped["_status"].max().map(_status_name)
    out["min_samples_per_dim"] = grouped["samples_per_dim"].min()
    return out.reset_index()


def aggregate_runs(per_layer: pd.DataFrame) -> pd.DataFrame:
    """Per run × site × bucket: the median over layers of the per-layer values (wide, one column per metric)."""
    metrics = [m for m in METRICS if m in per_layer.columns]
    grouped = per_layer.groupby(_KEYS, sort=True)
    out = grouped[metrics].median()
    out["dim"] = grouped["dim"].max()
    out["n_layers"] = grouped["layer"].nunique()
    out["n_steps"] = grouped["n_steps"].max()
    out["worst_status"] = grouped["worst_status"].agg(lambda s: _status_name(s.map(_STATUS_ORDER).max()))
    out["min_samples_per_dim"] = grouped["min_samples_per_dim"].min()
    for metric, frac in FRACTIONS:
        out[frac] = out[metric] / out["dim"]
    return out.reset_index()


def tidy(points: pd.DataFrame) -> pd.DataFrame:
    """Wide per-run aggregates → long: one row per run × site × bucket × metric (``metric``, ``value``)."""
    metrics = [m for m in METRICS if m in points.columns]
    return points.melt(id_vars=_KEYS, value_vars=metrics, var_name="metric", value_name="value")


def seed_spread(points: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per series × width × site × bucket × metric: median, min, max over seeds, and ``n_seeds``.

    ``n_seeds`` counts runs with a finite value, so a seed whose rank is NaN
    (undersampled) is visible as a smaller n.
    """
    long = tidy(points).merge(runs[["run_id", "series", "width"]], on="run_id")
    grouped = long.groupby(["series", "width", "site", "bucket", "metric"], sort=True)["value"]
    out = grouped.agg(median="median", min="min", max="max", n_seeds="count")
    return out.reset_index()


def _status_name(rank: float) -> str:
    return SAMPLING_STATUSES[int(rank)] if rank >= 0 else "unknown"
