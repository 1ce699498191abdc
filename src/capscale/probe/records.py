"""From accumulated states to records: the spectra table rows and per-step scalar summaries.

The table follows the ``spectra.parquet`` contract of docs/run-format.md: one row per
(step, layer, site, bucket) with every ``spectrum_summary`` field and the
eigenvalues (descending, float64) as a list column.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from capscale.probe.accumulate import Moments
from capscale.spectrum import eigenvalues_from_covariance, js_divergence, spectrum_summary

KEY_COLUMNS = ("step", "layer", "site", "bucket")
SUMMARY_FIELDS = tuple(spectrum_summary(None, 0, dim=2))
# JS divergence between the pre- and post-activation spectra of the same
# (step, layer, bucket) (NerVE); NaN unless both sites were measured.
# ``stack``: which FFN stack of the model ("encoder" / "decoder", "shared-expert"; "" for one stack).
COLUMNS = (*KEY_COLUMNS, "stack", "module", *SUMMARY_FIELDS, "js_divergence_pre_post", "eigenvalues")


class SpectrumError(ValueError):
    """A state that is not a valid covariance (NaN/Inf, materially indefinite), named by layer, site and bucket."""


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in COLUMNS})


def _dtype(col: str) -> str:
    if col in ("step", "layer", "n_samples", "dim", "max_empirical_rank"):
        return "int64"
    if col in ("site", "bucket", "stack", "module", "sampling_status", "eigenvalues"):
        return "object"
    return "float64"


def spectrum_row(m: Moments, *, step: int, layer: int, site: str, bucket: str, module: str) -> dict:
    """One table row.

    Fewer than 2 samples → an 'insufficient' row with NaN ranks and no
    eigenvalues. Rows that are all identical (zero variance, e.g. a bucket
    holding one token type at one position) have no ranks either: NaN ranks,
    ``trace`` and ``lambda_max`` 0, no eigenvalues. That is a fact about the
    data, not an error, so it must not stop a training run; NaN/Inf or a
    materially indefinite covariance is an error.
    """
    eigs, zero = None, False
    if m.count >= 2:
        cov = m.covariance()
        zero = bool((cov.diagonal() == 0).all())  # NaN is not 0: it goes on to be an error
        if not zero:
            # Decomposed by torch on the state's device: on a CPU, NumPy's LAPACK
            # would bring its own thread pool to fight torch's for the same cores.
            try:
                eigs = eigenvalues_from_covariance(cov)
            except ValueError as exc:  # non-finite, indefinite, variance below the floor
                raise SpectrumError(f"layer {layer} site {site!r} bucket {bucket!r} at step {step}: {exc}") from exc
    row = {"step": int(step), "layer": int(layer), "site": site, "bucket": bucket, "stack": "", "module": module}
    row.update(spectrum_summary(eigs, m.count, dim=m.dim))
    if zero:
        row["trace"] = row["lambda_max"] = 0.0
    row["js_divergence_pre_post"] = math.nan
    row["eigenvalues"] = None if eigs is None else eigs.tolist()
    return row


def add_js_divergence(rows: list[dict]) -> None:
    """Fill ``js_divergence_pre_post`` on both rows of every (step, stack, layer, bucket) with two spectra."""
    pairs: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault((r["step"], r.get("stack", ""), r["layer"], r["bucket"]), {})[r["site"]] = r
    for pair in pairs.values():
        pre, post = pair.get("pre"), pair.get("post")
        if pre and post and pre["eigenvalues"] is not None and post["eigenvalues"] is not None:
            js = js_divergence(np.asarray(pre["eigenvalues"]), np.asarray(post["eigenvalues"]))
            pre["js_divergence_pre_post"] = post["js_divergence_pre_post"] = js


def to_frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return empty_frame()
    # Column-wise construction: several times faster than a list of dicts for
    # the handful of rows a window yields, and the dtypes come out right.
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=_dtype(c)) for c in COLUMNS})


def scalar_summary(rows, prefix: str = "capscale") -> dict[str, float]:
    """Mean soft/hard rank over layers per (site, bucket): ``capscale/pre/all/soft_rank`` …

    ``rows``: spectra rows (dicts) or a spectra DataFrame. Ranks that are NaN
    (insufficient samples) are left out of the mean.
    """
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict(orient="records")
    acc: dict[str, list[float]] = {}
    for r in rows:
        for col in ("soft_rank", "hard_rank"):
            v = float(r[col])
            if math.isfinite(v):
                acc.setdefault(f"{prefix}/{r['site']}/{r['bucket']}/{col}", []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def monitor_summary(records: list[dict], prefix: str = "capscale/monitor") -> dict[str, float]:
    """Mean monitoring hard rank over layers per site: ``capscale/monitor/pre/hard_rank``."""
    by_site: dict[str, list[float]] = {}
    for r in records:
        if math.isfinite(r["hard_rank"]):
            by_site.setdefault(r["site"], []).append(r["hard_rank"])
    return {f"{prefix}/{s}/hard_rank": float(np.mean(v)) for s, v in by_site.items()}
