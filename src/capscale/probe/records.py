"""From accumulated states to records: the spectra table rows and per-step scalar summaries.

The table follows the ``spectra.parquet`` contract of docs/run-format.md: one row per
(step, layer, site, bucket) with every ``spectrum_summary`` field and the
eigenvalues (descending, float64) as a list column.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pandas as pd
import torch

from capscale.spectrum import (
    NonFiniteError,
    clamp_spectrum,
    eigenvalues_from_covariance,
    js_divergence,
    spectrum_summary,
)
from capscale.spectrum._torch import Moments
from capscale.spectrum.covariance import EIG_FLOOR, EIG_FLOOR_RTOL, SERIAL_EIG_MAX_DIM, _serial_blas

KEY_COLUMNS = ("step", "layer", "site", "bucket")
SUMMARY_FIELDS = tuple(spectrum_summary(None, 0, dim=2))
# JS divergence between the pre- and post-activation spectra of the same
# (step, layer, bucket) (NerVE); NaN unless both sites were measured.
# ``stack``: which FFN stack of the model ("encoder" / "decoder", "shared-expert"; "" for one stack).
# ``spectrum_method``: how the ranks were computed ("exact" eigvalsh, "lanczos", "hard-only"; see
# capscale.probe.estimated); ``soft_rank_stderr``: the standard error of a Lanczos soft rank (0 when exact).
COLUMNS = (
    *KEY_COLUMNS,
    "stack",
    "module",
    *SUMMARY_FIELDS,
    "js_divergence_pre_post",
    "spectrum_status",
    "spectrum_method",
    "soft_rank_stderr",
    "eigenvalues",
)
# What the decomposition met: "ok"; "insufficient" (< 2 samples); "zero_variance" (identical
# rows: no ranks); "tiny_variance" (λ_max < EIG_FLOOR / EIG_FLOOR_RTOL = 1e-6: ranks from a
# clamp relative to the spectrum's scale, see docs/conventions.md "Spectrum"); and, with NaN
# ranks and a warning naming the site, "indefinite" (a materially negative eigenvalue, e.g.
# float32 activations of 1e-22 whose products are subnormal) or "non_finite" (NaN/Inf state).
SPECTRUM_STATUSES = ("ok", "insufficient", "zero_variance", "tiny_variance", "indefinite", "non_finite")


class SpectrumError(ValueError):
    """A state that is not a valid covariance (NaN/Inf, materially indefinite), named by layer, site and bucket."""


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in COLUMNS})


def _dtype(col: str) -> str:
    if col in ("step", "layer", "n_samples", "dim", "max_empirical_rank"):
        return "int64"
    if col in (
        "site",
        "bucket",
        "stack",
        "module",
        "sampling_status",
        "spectrum_status",
        "spectrum_method",
        "eigenvalues",
    ):
        return "object"
    return "float64"


def spectrum_row(m: Moments, *, step: int, layer: int, site: str, bucket: str, module: str) -> dict:
    """One table row.

    Fewer than 2 samples → an 'insufficient' row with NaN ranks and no
    eigenvalues. Rows that are all identical (zero variance, e.g. a bucket
    holding one token type at one position) have no ranks either: NaN ranks,
    ``trace`` and ``lambda_max`` 0, no eigenvalues. A tiny but non-zero variance
    gets ranks from a clamp relative to its scale. A state that cannot be decomposed
    (NaN/Inf, materially indefinite) gets NaN ranks and a warning naming it. None is an
    error, so none stops a training run (``spectrum_status`` says which it was).
    """
    labels = {"step": step, "layer": layer, "site": site, "bucket": bucket, "module": module}
    return spectrum_rows([(m, labels)])[0]


def spectrum_rows(
    entries: list[tuple[Moments, dict]], batched: bool | None = None, method: str = "exact"
) -> list[dict]:
    """``spectrum_row`` for each ``(moments, labels)``, with one decomposition call per group.

    ``method``: "exact", or "lanczos" / "hard-only" / "auto" (``capscale.probe.estimated``).

    Host states go one by one through ``eigenvalues_from_covariance`` (NumPy's LAPACK on
    one thread up to ``SERIAL_EIG_MAX_DIM``, torch's above). Accelerator states of equal
    width are stacked into one batched ``eigvalsh`` (``batched=None``: only off the CPU;
    True forces it, e.g. to test the path on a CPU).
    """
    if method != "exact":
        from capscale.probe.estimated import estimated_row, resolve

        kinds = [resolve(method, m.dim) for m, _ in entries]
        if any(k != "exact" for k in kinds):
            exact = iter(spectrum_rows([e for e, k in zip(entries, kinds) if k == "exact"], batched))
            return [
                next(exact) if k == "exact" else estimated_row(m, labels, k, _named)
                for (m, labels), k in zip(entries, kinds)
            ]
    # Decomposed: each scatter, read by its upper triangle where that is all it holds; the
    # division by n − 1 is applied to the D eigenvalues rather than the D² entries.
    scatters: dict[int, torch.Tensor] = {}
    zero: set[int] = set()
    failed: dict[int, str] = {}  # states that could not be decomposed → their status
    variances: dict[int, np.ndarray] = {}  # unit variances (the diagonal, O(D)): dormant_frac
    for j, (m, labels) in enumerate(entries):
        if m.count >= 2:
            # A scatter's diagonal is ≥ 0 and bounds every entry (|S_ij| ≤ √(S_ii S_jj)):
            # its extremes say whether the state is all zero and whether it is finite.
            diag = m.scatter.diagonal().detach().double().cpu().numpy()
            lo, hi = float(diag.min()), float(diag.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                _undecomposed(failed, j, labels, NonFiniteError("covariance contains NaN or Inf"))
                continue
            variances[j] = diag / (m.count - 1)
            if hi == 0 and lo == 0:
                zero.add(j)
            else:
                scatters[j] = m.scatter
    eigs: dict[int, np.ndarray] = {}
    groups: dict[tuple, list[int]] = {}
    for j, s in scatters.items():
        stack = s.device.type != "cpu" if batched is None else batched
        key = (tuple(s.shape), s.device, entries[j][0].upper) if stack else ("one", j)
        groups.setdefault(key, []).append(j)
    # Host decompositions share one serial-BLAS scope (set and restored once, not per state).
    serial = any(s.device.type == "cpu" and s.shape[-1] <= SERIAL_EIG_MAX_DIM for s in scatters.values())
    with _serial_blas() if serial else contextlib.nullcontext():
        for members in groups.values():
            first = entries[members[0]][0]
            if len(members) == 1:
                j = members[0]
                try:
                    eigs[j] = eigenvalues_from_covariance(
                        scatters[j], divisor=first.count - 1, upper=first.upper, check_finite=False
                    )
                except ValueError as exc:  # non-finite eigenvalues, indefinite
                    _undecomposed(failed, j, entries[j][1], exc)
                continue
            raw = _batched_eigvalsh([scatters[j] for j in members], upper=first.upper)
            for j, r in zip(members, raw):
                try:
                    eigs[j] = clamp_spectrum(r / (entries[j][0].count - 1), ascending=True)
                except ValueError as exc:
                    _undecomposed(failed, j, entries[j][1], exc)
    rows = []
    for j, (m, labels) in enumerate(entries):
        e = eigs.get(j)
        row = {k: labels.get(k, "") for k in ("step", "layer", "site", "bucket", "stack", "module")}
        row["step"], row["layer"] = int(row["step"]), int(row["layer"])
        row.update(spectrum_summary(e, m.count, dim=m.dim, variances=variances.get(j)))
        if j in zero:
            row["trace"] = row["lambda_max"] = 0.0
        row["js_divergence_pre_post"] = math.nan
        row["spectrum_status"] = failed.get(j) or _status(m.count, j in zero, e)
        row["spectrum_method"], row["soft_rank_stderr"] = "exact", 0.0
        row["eigenvalues"] = None if e is None else e.tolist()
        rows.append(row)
    return rows


def _batched_eigvalsh(covs: list[torch.Tensor], upper: bool = False) -> np.ndarray:
    """Raw eigenvalues of equal-shaped matrices on one device, one ``eigvalsh`` call (float64);
    ``upper``: read their upper triangles. Their diagonals were checked finite (``spectrum_rows``)."""
    batch = torch.stack([c.double() for c in covs])
    return torch.linalg.eigvalsh(batch, UPLO="U" if upper else "L").cpu().numpy()


def _undecomposed(failed: dict[int, str], j: int, labels: dict, exc: Exception) -> None:
    """A state that cannot be decomposed is a record (NaN ranks, its status) and a warning
    naming it, never an error: the probe's numerics do not stop a training run."""
    failed[j] = "non_finite" if isinstance(exc, NonFiniteError) else "indefinite"
    warnings.warn(f"capscale: {_named(labels, exc)}; recorded with spectrum_status {failed[j]!r}", stacklevel=3)


def _named(labels: dict, exc: Exception) -> SpectrumError:
    return SpectrumError(
        f"layer {labels['layer']} site {labels['site']!r} bucket {labels['bucket']!r} at step {labels['step']}: {exc}"
    )


def _status(count: int, zero: bool, eigs) -> str:
    if count < 2:
        return "insufficient"
    if zero:
        return "zero_variance"
    return "tiny_variance" if eigs[0] * EIG_FLOOR_RTOL < EIG_FLOOR else "ok"


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
