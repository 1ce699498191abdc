"""One record per spectrum: ranks, NerVE metrics and sampling reliability."""

from __future__ import annotations

import math

import numpy as np

from capscale.spectrum import ranks

# Samples per dimension (N/D) at or above which a spectrum counts as well /
# moderately sampled; below 3 it is severely undersampled. Documented
# heuristics (as in spectral-telemetry), not statistical guarantees.
WELL_SAMPLED = 10.0
MODERATELY_UNDERSAMPLED = 3.0

SAMPLING_STATUSES = (
    "well_sampled",
    "moderately_undersampled",
    "severely_undersampled",
    "insufficient",
)

RANK_FIELDS = (
    "soft_rank",
    "hard_rank",
    "renyi_rank_0_5",
    "renyi_rank_inf",
    "asymmetry",
    "spectral_entropy",
    "participation_ratio",
    "early_enrichment",
    "lambda_max",
    "trace",
)


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


def spectrum_summary(eigs, n_samples: int, *, dim: int | None = None) -> dict:
    """Every scalar of one spectrum as a flat dict (eigenvalues not included).

    ``eigs``: non-negative covariance eigenvalues (e.g. ``StreamingCovariance.eigenvalues()``),
    or ``None`` when fewer than 2 samples were seen; then every rank is NaN and
    ``sampling_status`` is ``"insufficient"`` (recorded, not raised).
    ``dim`` defaults to the number of eigenvalues.
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
    if eigs is None or n < 2:
        rec.update({k: math.nan for k in RANK_FIELDS})
    else:
        r1, r2 = ranks.soft_rank(lam), ranks.hard_rank(lam)
        rec.update(
            soft_rank=r1,
            hard_rank=r2,
            renyi_rank_0_5=ranks.renyi_rank(lam, 0.5),
            renyi_rank_inf=ranks.renyi_rank(lam, math.inf),
            asymmetry=math.log(r1 / r2),
            spectral_entropy=math.log(r1),
            participation_ratio=r2,
            early_enrichment=ranks.early_enrichment(lam),
            lambda_max=float(lam.max()),
            trace=float(lam.sum()),
        )
    for kind in ("soft", "hard"):
        r = rec[f"{kind}_rank"]
        rec[f"{kind}_rank_frac_dim"] = r / dim
        rec[f"{kind}_rank_frac_max"] = r / max_rank if max_rank > 0 else math.nan
    return rec
