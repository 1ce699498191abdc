"""One record per spectrum: ranks, NerVE metrics and sampling reliability."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from capscale.spectrum import ranks

# Samples per dimension (N/D) at or above which a spectrum counts as well /
# moderately sampled; below 3 it is severely undersampled. Documented
# heuristics (as in spectral-telemetry), not statistical guarantees.
WELL_SAMPLED = 10.0
MODERATELY_UNDERSAMPLED = 3.0

# A unit (one coordinate of the measured site) is dormant when its variance is at most this
# fraction of the mean unit variance (tr(C) / D) in the window: it carries almost none of
# the site's variance. Relative, so the fraction does not depend on the activations' scale;
# a documented parameter (the plasticity literature's dormant-neuron score is the same idea
# on mean |activation|), not a statistical test.
DORMANT_REL_VARIANCE = 1e-3

SAMPLING_STATUSES = (
    "well_sampled",
    "moderately_undersampled",
    "severely_undersampled",
    "insufficient",
)


@dataclass(frozen=True)
class Metric:
    """One scalar of a spectrum: the single declaration from which the summary fields, the
    aggregated metrics (``capscale.analysis``) and the report's rank columns are derived."""

    name: str
    # (eigenvalues, their normalised p = λ / Σλ, the metrics declared before it) → value;
    # derived metrics reuse earlier ones
    compute: Callable[[np.ndarray, np.ndarray, dict], float]
    description: str
    aggregated: bool = True  # aggregated per run × site × bucket by the analysis
    label: str | None = None  # column label in the report's rank tables; None: not shown there
    frac: str | None = None  # also as a fraction of D: ``<name>_frac_dim`` / ``_frac_max``, aggregated as ``frac``
    # computed from the covariance's diagonal (the unit variances, O(D)) instead of the
    # eigenvalues: ``compute(variances, None, metrics)``; NaN when no diagonal is given
    diagonal: bool = False


def dormant_fraction(variances, rel: float = DORMANT_REL_VARIANCE) -> float:
    """Fraction of units whose variance is ≤ ``rel`` × the mean unit variance.

    ``variances``: the covariance's diagonal (any non-negative scale). All-zero variances
    (identical rows) make every unit dormant: 1.0.
    """
    var = np.asarray(variances, dtype=np.float64).reshape(-1)
    if var.size == 0:
        raise ValueError("no unit variances")
    if not np.all(np.isfinite(var)):
        raise ValueError("unit variances contain NaN or Inf")
    return float(np.count_nonzero(var <= rel * var.mean()) / var.size)


# Each rank is computed from p, validated and normalised once per spectrum (the same
# arithmetic as the public functions of ``capscale.spectrum.ranks``, which do it per call).
SPECTRUM_METRICS: tuple[Metric, ...] = (
    Metric("soft_rank", lambda lam, p, m: ranks._renyi(p, 1.0), "R1 = exp(−Σ p log p)", label="R1", frac="soft_frac"),
    Metric("hard_rank", lambda lam, p, m: ranks._hard(p), "R2 = (Σλ)² / Σλ²", label="R2", frac="hard_frac"),
    Metric("renyi_rank_0_5", lambda lam, p, m: ranks._renyi(p, 0.5), "Rényi rank R½ = (Σ √p)²"),
    Metric("renyi_rank_inf", lambda lam, p, m: ranks._renyi(p, math.inf), "R∞ = 1 / max p"),
    Metric("asymmetry", lambda lam, p, m: math.log(m["soft_rank"] / m["hard_rank"]), "log(R1 / R2) ≥ 0"),
    Metric("spectral_entropy", lambda lam, p, m: math.log(m["soft_rank"]), "−Σ p log p (nats)"),
    Metric("participation_ratio", lambda lam, p, m: m["hard_rank"], "= hard_rank"),
    Metric("early_enrichment", lambda lam, p, m: ranks._early_enrichment(p), "NerVE early eigenvalue enrichment"),
    Metric("lambda_max", lambda lam, p, m: float(lam.max()), "largest eigenvalue", aggregated=False),
    Metric("trace", lambda lam, p, m: float(lam.sum()), "Σλ (total variance)", aggregated=False),
    Metric(
        "dormant_frac",
        lambda var, p, m: dormant_fraction(var),
        f"fraction of units with variance ≤ {DORMANT_REL_VARIANCE:g} × mean unit variance (from the diagonal)",
        diagonal=True,
    ),
)

RANK_FIELDS = tuple(m.name for m in SPECTRUM_METRICS)
AGGREGATED_METRICS = tuple(m.name for m in SPECTRUM_METRICS if m.aggregated)
REPORT_METRICS = tuple(m for m in SPECTRUM_METRICS if m.label is not None)


def sampling_status(n_samples: int, dim: int) -> str:
    """Reliability class of an N-sample covariance in D dimensions."""
    if n_samples < 2:
        return "insufficient"
    ratio = n_samples / dim
    if ratio >= WELL_SAMPLED:
        return "well_sampled"
    if ratio >= MODERATELY_UNDERSAMPLED:
        return "moderately_undersampled"
    return "severely_undersampled"


def spectrum_summary(eigs, n_samples: int, *, dim: int | None = None, variances=None) -> dict:
    """Every scalar of one spectrum as a flat dict (eigenvalues not included).

    ``eigs``: non-negative covariance eigenvalues (e.g. ``StreamingCovariance.eigenvalues()``),
    or ``None`` when fewer than 2 samples were seen; then every rank is NaN and
    ``sampling_status`` is ``"insufficient"`` (recorded, not raised).
    ``dim`` defaults to the number of eigenvalues. ``variances``: the covariance's diagonal
    (D unit variances), for the metrics computed from it (``dormant_frac``); without it
    they are NaN. They are computed whenever N ≥ 2, also where ``eigs`` is None (a
    zero-variance state has no ranks but every unit dormant).
    """
    n = int(n_samples)
    if n < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if eigs is not None:
        lam = np.asarray(eigs, dtype=np.float64).reshape(-1)
        dim = lam.size if dim is None else int(dim)
        if lam.size != dim:
            raise ValueError(f"{lam.size} eigenvalues for dim={dim}")
    elif dim is None:
        raise ValueError("dim is required when there are no eigenvalues")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}: one eigenvalue has rank 1 by definition")
    max_rank = max(0, min(dim, n - 1))
    rec = {
        "n_samples": n,
        "dim": dim,
        "samples_per_dim": n / dim,
        "max_empirical_rank": max_rank,
        "sampling_status": sampling_status(n, dim),
    }
    if variances is not None:
        variances = np.asarray(variances, dtype=np.float64).reshape(-1)
        if variances.size != dim:
            raise ValueError(f"{variances.size} unit variances for dim={dim}")
    p = ranks.probabilities(lam) if eigs is not None and n >= 2 else None
    for m in SPECTRUM_METRICS:
        if m.diagonal:
            rec[m.name] = m.compute(variances, None, rec) if variances is not None and n >= 2 else math.nan
        else:
            rec[m.name] = m.compute(lam, p, rec) if p is not None else math.nan
    for m in SPECTRUM_METRICS:
        if m.frac is not None:
            rec[f"{m.name}_frac_dim"] = rec[m.name] / dim
            rec[f"{m.name}_frac_max"] = rec[m.name] / max_rank if max_rank > 0 else math.nan
    return rec
