"""Ranks of a covariance without its eigendecomposition: stochastic Lanczos quadrature (SLQ).

The soft rank and the Rényi ranks are traces of a matrix function of the normalised
covariance ``B = C / tr(C)`` (eigenvalues ``p_i``): ``H = tr(−B log B)``, ``Σ p^α = tr(B^α)``.
For a unit vector ``v``, ``vᵀ f(B) v`` is an integral against the spectral measure of
``(B, v)``, and ``k`` steps of Lanczos from ``v`` give its ``k``-node Gauss quadrature:
``Σ_j τ_j² f(θ_j)`` with ``θ`` the eigenvalues of the Lanczos tridiagonal and ``τ`` the
first components of its eigenvectors. The trace is estimated as in Hutch++
(Meyer et al. 2021): a block ``Q`` spanning the leading eigendirections (randomised
subspace iteration) contributes ``Σ_j q_jᵀ f(B) q_j`` with no sampling error, and the
rest ``tr((I − QQᵀ) f(B) (I − QQᵀ))`` is Hutchinson's estimate from Rademacher probes
projected off ``Q``. Deflating the large eigenvalues is what keeps the probes' variance
small for spiky spectra, where a few ``p`` carry most of the entropy.

The core is NumPy and sees the matrix only through ``matmat`` (a callable mapping a
``(D, b)`` block ``V`` to ``B·V``), so a tensor on an accelerator, or a matrix whose
rows are spread over ranks, is used the same way. Everything is float64 and seeded:
equal inputs give equal results.

The reported standard error is that of the probes (the sample standard deviation of the
Hutchinson terms over √m); the quadrature's bias is not in it (it is what the tests
and ``benchmarks/bench_scale.py`` measure against the exact ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal

# Defaults: within 1% of the exact soft rank across flat, power-law, exponential and
# low-rank + noise spectra at D ≤ 8,192 (tests/test_spectrum_lanczos.py, docs/benchmarks.md).
PROBES = 32  # Rademacher probe vectors (Hutchinson part)
STEPS = 48  # Lanczos steps per start vector (Gauss quadrature nodes)
DEFLATE = 32  # leading directions taken out of the sampled part
POWER = 2  # subspace iterations that find them

Matmat = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Estimate:
    """A trace estimate and the standard error of its sampled part."""

    value: float
    stderr: float


@dataclass(frozen=True)
class Quadrature:
    """Gauss quadrature nodes and weights of each start vector (weights include ‖v‖²).

    ``nodes[i]``/``weights[i]``: start vector ``i``; the first ``n_fixed`` are the deflation
    block's columns (exact part), the rest the probes (sampled part).
    """

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    n_fixed: int
    dim: int

    def trace(self, f: Callable[[np.ndarray], np.ndarray], known: tuple[float, ...] = ()) -> Estimate:
        """``tr f(B)`` estimated, with the probes' standard error.

        ``known``: the exact traces ``tr B⁰, tr B¹, …`` (e.g. ``(D, 1, ‖B‖²_F)`` for a normalised
        covariance, all O(D²) or less). Their probe estimates are control variates: the
        part of each probe's term that a polynomial in ``B`` of that degree explains is
        replaced by its exact value (the quadrature integrates such polynomials exactly),
        and only the rest is sampled. For ``−p log p`` this removes most of the variance.
        """
        terms = self._terms(f)
        fixed, sampled = terms[: self.n_fixed], terms[self.n_fixed :]
        m = sampled.size
        if m == 0:
            return Estimate(float(fixed.sum()), 0.0)
        ctrl = np.stack([self._terms(lambda t, j=j: t**j) for j in range(len(known))], axis=1)
        # The controls' exact means over the probes: tr of the part orthogonal to the fixed block.
        mu = np.asarray(known, dtype=np.float64) - ctrl[: self.n_fixed].sum(axis=0)
        x = ctrl[self.n_fixed :] - mu
        y = sampled
        if known and m > len(known) + 1:
            xc = x - x.mean(axis=0)
            coef = np.linalg.lstsq(xc, y - y.mean(), rcond=None)[0]
            y = y - x @ coef  # same expectation (E x = 0), less variance
            dof = m - len(known) - 1
        else:
            dof = m - 1
        se = float(math.sqrt(((y - y.mean()) ** 2).sum() / dof / m)) if dof > 0 else 0.0
        return Estimate(float(fixed.sum() + y.mean()), se)

    def _terms(self, f) -> np.ndarray:
        return np.array([float(w @ f(np.clip(t, 0.0, None))) for t, w in zip(self.nodes, self.weights)])

    @property
    def lambda_max(self) -> float:
        """The largest Ritz value: a lower bound on λ_max that converges first."""
        return float(max(t.max() for t in self.nodes if t.size))


def validation_spectrum(kind: str, d: int) -> np.ndarray:
    """The spectra of different decay on which the defaults are validated against exact
    (tests and ``benchmarks/bench_scale.py``): ``VALIDATION_SPECTRA``."""
    i = np.arange(1, d + 1, dtype=np.float64)
    return {
        "flat": np.ones(d),
        "power-law-0.5": i**-0.5,
        "power-law-1": i**-1.0,
        "power-law-2": i**-2.0,
        "exponential": np.exp(-i / (d / 20)),
        "low-rank+noise": np.r_[np.full(10, 100.0), np.full(d - 10, 0.01)],
    }[kind]


VALIDATION_SPECTRA = ("flat", "power-law-0.5", "power-law-1", "power-law-2", "exponential", "low-rank+noise")


def lanczos(
    matmat: Matmat, start: np.ndarray, steps: int, reorth: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Independent Lanczos runs from the columns of ``start`` (``D × b``), advanced together (one
    ``matmat`` per step), with full reorthogonalisation; returns each run's Ritz values and
    quadrature weights (``τ² ‖v‖²``). A run whose Krylov space is exhausted stops there."""
    d, b = start.shape
    norms = np.linalg.norm(start, axis=0)
    live = norms > 0
    q = np.where(live, start / np.where(live, norms, 1.0), 0.0)
    steps = max(1, min(int(steps), d))
    basis = np.zeros((b, steps, d))  # per run: its Lanczos vectors as rows (batched GEMVs below)
    alpha = np.zeros((steps, b))
    beta = np.zeros((steps, b))
    length = np.zeros(b, dtype=np.int64)
    for j in range(steps):
        basis[:, j] = q.T
        length[live] = j + 1
        w = np.asarray(matmat(q), dtype=np.float64)
        alpha[j] = np.einsum("db,db->b", q, w)
        # Full reorthogonalisation (twice is enough, Kahan): the three-term recurrence alone
        # loses orthogonality as Ritz values converge, and the quadrature with it.
        if reorth:
            past = basis[:, : j + 1]
            for _ in range(2):
                coef = np.matmul(past, w.T[:, :, None])  # (b, j+1, 1)
                w -= np.matmul(past.transpose(0, 2, 1), coef)[:, :, 0].T
        nrm = np.linalg.norm(w, axis=0)
        scale = np.maximum(np.abs(alpha[j]), 1e-300)
        live &= nrm > 1e-12 * scale  # an invariant subspace reached: this run is exact already
        beta[j] = np.where(live, nrm, 0.0)
        q = np.where(live, w / np.where(live, nrm, 1.0), 0.0)
        if not live.any():
            break
    nodes, weights = [], []
    for c in range(b):
        n = int(length[c])
        if n == 0:
            nodes.append(np.zeros(0))
            weights.append(np.zeros(0))
            continue
        theta, vecs = eigh_tridiagonal(alpha[:n, c], beta[: n - 1, c])
        nodes.append(theta)
        weights.append(vecs[0] ** 2 * norms[c] ** 2)
    return nodes, weights


def quadrature(
    matmat: Matmat,
    dim: int,
    *,
    probes: int = PROBES,
    steps: int = STEPS,
    deflate: int = DEFLATE,
    power: int = POWER,
    seed: int = 0,
) -> Quadrature:
    """Deflation block and probes for the symmetric PSD matrix behind ``matmat`` (``dim × dim``)."""
    rng = np.random.default_rng(seed)
    k = min(int(deflate), dim)
    fixed = np.zeros((dim, 0))
    if k > 0:
        y = matmat(rng.standard_normal((dim, k)))
        for _ in range(int(power)):
            y = matmat(np.linalg.qr(y)[0])
        fixed = np.linalg.qr(y)[0]
    m = int(probes) if k < dim else 0  # the block spans everything: nothing left to sample
    z = rng.choice((-1.0, 1.0), size=(dim, m))
    if k and m:
        z -= fixed @ (fixed.T @ z)
    nodes, weights = lanczos(matmat, np.concatenate([fixed, z], axis=1), steps)
    return Quadrature(nodes, weights, fixed.shape[1], dim)


def _neg_xlogx(x: np.ndarray) -> np.ndarray:
    return -x * np.log(np.where(x > 0, x, 1.0))


def lanczos_ranks(
    matmat: Matmat,
    dim: int,
    trace: float,
    frob2: float | None = None,
    *,
    probes: int = PROBES,
    steps: int = STEPS,
    deflate: int = DEFLATE,
    power: int = POWER,
    seed: int = 0,
) -> dict[str, float]:
    """Soft rank, Rényi ½ and ∞ ranks, spectral entropy and λ_max of the PSD matrix ``C``
    behind ``matmat`` (``C·V``), given its exact ``trace`` (and ``frob2`` = ‖C‖²_F, a
    control variate that sharpens the estimate), by SLQ; with standard errors
    ``soft_rank_stderr`` and ``renyi_rank_0_5_stderr`` (delta method from the probes).
    Ranks are clipped to [1, dim]."""
    if not (math.isfinite(trace) and trace > 0):
        raise ValueError(f"trace must be finite and > 0, got {trace}")
    quad = quadrature(
        lambda v: np.asarray(matmat(v), dtype=np.float64) / trace,
        dim,
        probes=probes,
        steps=steps,
        deflate=deflate,
        power=power,
        seed=seed,
    )
    known = (float(dim), 1.0) if frob2 is None else (float(dim), 1.0, frob2 / trace**2)
    h = quad.trace(_neg_xlogx, known)
    soft = math.exp(h.value)
    half = quad.trace(np.sqrt, known)
    lam_max = quad.lambda_max
    return {
        "soft_rank": min(max(soft, 1.0), float(dim)),
        "soft_rank_stderr": soft * h.stderr,
        "spectral_entropy": h.value,
        "renyi_rank_0_5": min(max(half.value**2, 1.0), float(dim)),
        "renyi_rank_0_5_stderr": 2 * abs(half.value) * half.stderr,
        "renyi_rank_inf": 1.0 / lam_max if lam_max > 0 else math.nan,
        "lambda_max": lam_max * trace,
    }
