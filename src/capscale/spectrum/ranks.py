"""Effective ranks and NerVE metrics of a covariance eigenspectrum.

All functions take non-negative eigenvalues (any order) and compute in float64.
``p_i = λ_i / Σλ``; zero eigenvalues contribute nothing (0·log 0 = 0), so a
rank-k flat spectrum has every rank exactly k. Covariance-derived spectra are
clamped at 1e-12 before they reach here (``StreamingCovariance.eigenvalues``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.distance import jensenshannon

from capscale.spectrum._arrays import is_torch, to_numpy

# Eigenvalues more negative than this fraction of the largest |λ| are not
# round-off: the matrix is not a covariance.
INDEFINITE_RTOL = 1e-6


def _eigs(eigenvalues) -> tuple[np.ndarray, float]:
    """Validated eigenvalues and their sum."""
    lam = to_numpy(eigenvalues, "float64").reshape(-1)
    if lam.size == 0:
        raise ValueError("empty spectrum: need at least one eigenvalue")
    total = lam.sum()  # a finite sum has no NaN/Inf among its terms; only a non-finite one needs the full check
    if not math.isfinite(total) and not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues contain NaN or Inf")
    if lam.min() < 0:
        raise ValueError(
            f"eigenvalues must be non-negative (min {lam.min():.3e}); clamp round-off "
            "first, e.g. with StreamingCovariance.eigenvalues()"
        )
    if total <= 0:
        raise ValueError("all eigenvalues are zero: the spectrum has no variance")
    return lam, total


def probabilities(eigenvalues) -> np.ndarray:
    """The normalised spectrum p = λ / Σλ (by way of λ / λ_max where Σλ overflows float64)."""
    lam, total = _eigs(eigenvalues)
    if not math.isfinite(total):  # every λ is finite (checked), their sum is not
        lam = lam / lam.max()
        total = lam.sum()
    return lam / total


def spectral_entropy(eigenvalues) -> float:
    """Shannon entropy of p in nats (NerVE's spectral entropy)."""
    return _entropy(probabilities(eigenvalues))


def soft_rank(eigenvalues) -> float:
    """Shannon effective rank R1 = exp(H(p))."""
    return math.exp(spectral_entropy(eigenvalues))


def hard_rank(eigenvalues) -> float:
    """Participation ratio R2 = (Σλ)² / Σλ² = 1 / Σp²."""
    return _hard(probabilities(eigenvalues))


participation_ratio = hard_rank


def renyi_rank(eigenvalues, alpha: float) -> float:
    """Rényi effective rank R_α = (Σ p^α)^(1/(1-α)), α ∈ (0, ∞].

    α = 1 is the soft rank, α = 2 the hard rank, α = ∞ gives 1 / max p.
    Non-increasing in α, so R∞ ≤ R2 ≤ R1 ≤ D.
    """
    alpha = float(alpha)
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"Rényi order alpha must be in (0, inf], got {alpha}")
    return _renyi(probabilities(eigenvalues), alpha)


# The ranks of a validated, normalised spectrum p (``probabilities``): the functions above
# check and normalise once per call; ``spectrum_summary`` does it once for all of them.
def _entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def _hard(p: np.ndarray) -> float:
    s = p / p.max()  # (Σs)² / Σs² rather than 1 / Σp²: exactly k for a flat rank-k spectrum
    return float(s.sum() ** 2 / np.dot(s, s))


def _renyi(p: np.ndarray, alpha: float) -> float:
    if math.isinf(alpha):
        return float(1.0 / p.max())
    if alpha == 1.0:
        return math.exp(_entropy(p))
    x = alpha * np.log(p[p > 0])
    # log R = logsumexp(α log p) / (1 - α): stable near α = 1 and for tiny p (NumPy's own
    # max-shifted form: scipy's array-API logsumexp costs 10x more at these sizes).
    top = x.max()
    return float(math.exp((top + math.log(np.exp(x - top).sum())) / (1.0 - alpha)))


def asymmetry(eigenvalues) -> float:
    """log(R1 / R2) ≥ 0: how much broader the soft rank sees the spectrum than the hard rank."""
    return math.log(soft_rank(eigenvalues) / hard_rank(eigenvalues))


def hard_rank_from_covariance(cov) -> float:
    """R2 = tr(C)² / ‖C‖²_F, with no eigendecomposition (O(D²)).

    A torch tensor is reduced on its own device (float64), so a CUDA
    accumulator yields its cheap monitoring rank without a D×D host copy.
    """
    c = cov.detach().double() if is_torch(cov) else np.asarray(cov, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(c.shape)}")
    scale = float(abs(c).max())
    if not math.isfinite(scale):
        raise ValueError("covariance contains NaN or Inf")
    trace = float(c.trace())
    if scale == 0 or trace <= 0:
        raise ValueError("covariance has no variance (trace is zero)")
    c = c / scale  # ‖C‖²_F would overflow first for huge entries
    return (trace / scale) ** 2 / float((c * c).sum())


def early_enrichment(eigenvalues) -> float:
    """NerVE eigenvalue early enrichment (EEE).

    With the spectrum sorted descending and ``c_k`` the cumulative explained
    variance of the top k modes, ``AUC = Σ_{k=1..D} c_k``. EEE is the AUC in
    excess of ``0.5·D`` (the area under a flat spectrum's straight line),
    relative to ``0.5·D``: ``(AUC - 0.5 D) / (0.5 D)``. A flat spectrum gives
    1/D (→ 0), a single spike gives 1.
    """
    return _early_enrichment(probabilities(eigenvalues))


def _early_enrichment(p: np.ndarray) -> float:
    d = p.size
    auc = float(np.cumsum(np.sort(p)[::-1]).sum())
    return (auc - 0.5 * d) / (0.5 * d)


def js_divergence(eigs_a, eigs_b) -> float:
    """Jensen–Shannon divergence (nats, in [0, ln 2]) between two normalised spectra.

    Both are sorted descending and zero-padded to equal length, so pre- and
    post-activation spectra of different D compare mode by mode.
    """
    p = np.sort(probabilities(eigs_a))[::-1]
    q = np.sort(probabilities(eigs_b))[::-1]
    d = max(p.size, q.size)
    p = np.pad(p, (0, d - p.size))
    q = np.pad(q, (0, d - q.size))
    return float(jensenshannon(p, q) ** 2)  # scipy returns the JS *distance*
