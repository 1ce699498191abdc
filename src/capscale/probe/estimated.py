"""Spectra rows without an eigendecomposition: the hard rank from tr(C)²/‖C‖²_F, the soft and Rényi
ranks by stochastic Lanczos quadrature (``capscale.spectrum.lanczos``).

``spectrum`` chooses per state: "exact" (``eigvalsh``, every field and the eigenvalues),
"lanczos" (soft rank with its standard error, Rényi ½ and ∞, λ_max, the exact hard rank
and trace; no eigenvalues, no early enrichment), "hard-only" (hard rank and trace), or
"auto": exact where a float64 decomposition of the state fits in half the available host
memory, else Lanczos. Rows say which (``spectrum_method``).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from capscale.spectrum import EIG_FLOOR, EIG_FLOOR_RTOL, NonFiniteError, hard_rank_from_covariance, spectrum_summary
from capscale.spectrum._torch import Moments, symmetrize_
from capscale.spectrum.lanczos import lanczos_ranks
from capscale.spectrum.summary import SPECTRUM_METRICS, dormant_fraction

SPECTRUM_METHODS = ("auto", "exact", "lanczos", "hard-only")
# A float64 eigvalsh holds the matrix, its copy and LAPACK's workspace: about 3 D² doubles.
EIGVALSH_BYTES_PER_ENTRY = 3 * 8


def available_host_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve(method: str, dim: int, available: int | None = None) -> str:
    """The method used for a state of width ``dim``: ``method`` itself unless it is "auto"."""
    if method != "auto":
        return method
    available = available_host_bytes() if available is None else available
    if available is None:
        return "exact"
    return "exact" if EIGVALSH_BYTES_PER_ENTRY * dim * dim <= available / 2 else "lanczos"


def spectrum_note(method: str, dims: list[int]) -> str:
    """One line for ``probe.description``: the method and, for "auto", what it resolves to."""
    if method != "auto":
        return f"{method} (as requested)"
    if not dims:
        return "auto (exact eigvalsh where a state's decomposition fits in half the free host memory, else Lanczos)"
    chosen = sorted({resolve("auto", d) for d in dims})
    return f"auto → {'/'.join(chosen)} (widest state D={max(dims)}; exact where its eigvalsh fits in host memory)"


def blank_row(count: int, dim: int, labels: dict, method: str) -> dict:
    """A spectra row's labels and sample fields, before its ranks (see :func:`estimated_row`)."""
    row = {k: labels.get(k, "") for k in ("step", "layer", "site", "bucket", "stack", "module")}
    row["step"], row["layer"] = int(row["step"]), int(row["layer"])
    row.update(spectrum_summary(None, count, dim=dim))
    row.update(js_divergence_pre_post=math.nan, spectrum_method=method, soft_rank_stderr=math.nan, eigenvalues=None)
    return row


def estimated_row(m: Moments, labels: dict, method: str, named) -> dict:
    """A spectra row for ``m`` by ``method`` ("lanczos" or "hard-only"); ``named(labels, exc)``
    makes the error raised for a state that is not a covariance."""
    row = blank_row(m.count, m.dim, labels, method)
    if m.count < 2:
        row["spectrum_status"] = "insufficient"
        return row
    s = symmetrize_(m.scatter) if m.upper else m.scatter  # the accumulator's own buffer: its lower half is free
    lo, hi = torch.stack(torch.aminmax(s.diagonal())).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        # recorded (NaN ranks, its status, a warning naming it) as the exact rows do: never an error
        warnings.warn(
            f"capscale: {named(labels, NonFiniteError('covariance contains NaN or Inf'))}; "
            "recorded with spectrum_status 'non_finite'",
            stacklevel=3,
        )
        row["spectrum_status"] = "non_finite"
        return row
    row["dormant_frac"] = dormant_fraction(s.diagonal().detach().double().cpu().numpy() / (m.count - 1))
    if hi == 0 and lo == 0:
        row.update(trace=0.0, lambda_max=0.0, spectrum_status="zero_variance")
        return row
    div = m.count - 1
    trace = float(s.diagonal().sum()) / div
    try:
        hard = hard_rank_from_covariance(s)  # scale-free: the scatter's equals the covariance's
    except ValueError as exc:
        raise named(labels, exc) from exc

    def matmat(v: np.ndarray) -> np.ndarray:
        return (s @ torch.from_numpy(v).to(s.device, s.dtype)).cpu().numpy() / div

    frob2 = float((s / hi).square().sum()) * (hi / div) ** 2 if method == "lanczos" else math.nan
    return finish_row(row, method, m.dim, trace, hard, frob2, matmat)


def finish_row(row: dict, method: str, dim: int, trace: float, hard: float, frob2: float, matmat) -> dict:
    """``row``'s ranks from the covariance's exact ``trace``, hard rank and ``frob2`` (‖C‖²_F) and,
    for "lanczos", its products ``matmat(V) = C·V`` (SLQ, ``lanczos_ranks``' defaults, seed 0)."""
    est = {"hard_rank": hard, "participation_ratio": hard, "trace": trace}
    lam_max = None
    if method == "lanczos":
        got = lanczos_ranks(matmat, dim, trace, frob2)
        lam_max = got["lambda_max"]
        soft = got["soft_rank"]
        est.update(
            soft_rank=soft,
            spectral_entropy=got["spectral_entropy"],
            renyi_rank_0_5=got["renyi_rank_0_5"],
            renyi_rank_inf=got["renyi_rank_inf"],
            lambda_max=lam_max,
            asymmetry=math.log(soft / hard),
        )
        row["soft_rank_stderr"] = got["soft_rank_stderr"]
    row.update(est)
    for metric in SPECTRUM_METRICS:
        if metric.frac is not None:
            row[f"{metric.name}_frac_dim"] = row[metric.name] / dim
            mr = row["max_empirical_rank"]
            row[f"{metric.name}_frac_max"] = row[metric.name] / mr if mr > 0 else math.nan
    # Tiny variance as in the exact rows (λ_max below the floor); without λ_max, the trace bounds it.
    scale = lam_max if lam_max is not None else trace
    row["spectrum_status"] = "tiny_variance" if scale * EIG_FLOOR_RTOL < EIG_FLOOR else "ok"
    return row
