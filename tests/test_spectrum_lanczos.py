"""Ranks without an eigendecomposition: stochastic Lanczos quadrature and the hard rank from the trace."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capscale.spectrum import hard_rank, hard_rank_from_covariance, renyi_rank, soft_rank
from capscale.spectrum.lanczos import lanczos, lanczos_ranks, quadrature, validation_spectrum


def _rotated(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    """A covariance with spectrum ``lam`` in a random basis (an axis-aligned one would flatter the probes)."""
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))[0]
    return (q * lam) @ q.T


def _ranks(c: np.ndarray, **kw) -> dict:
    return lanczos_ranks(lambda v: c @ v, c.shape[0], float(np.trace(c)), float((c * c).sum()), **kw)


@pytest.mark.parametrize(
    "kind", ["flat", "power-law-0.5", "power-law-1", "power-law-2", "exponential", "low-rank+noise"]
)
def test_default_soft_rank_within_one_percent_of_exact(kind):
    d = 512
    lam = validation_spectrum(kind, d)
    got = _ranks(_rotated(lam))
    exact = soft_rank(lam)
    assert got["soft_rank"] == pytest.approx(exact, rel=0.01)
    # The stated error is honest: the estimate is within 4 standard errors (or round-off) of the truth.
    assert abs(got["soft_rank"] - exact) <= 4 * got["soft_rank_stderr"] + 1e-9 * exact
    assert got["renyi_rank_inf"] == pytest.approx(renyi_rank(lam, math.inf), rel=1e-6)
    assert got["lambda_max"] == pytest.approx(lam.max(), rel=1e-6)
    assert got["spectral_entropy"] == pytest.approx(math.log(got["soft_rank"]), rel=1e-12)


@given(
    decay=st.floats(0.3, 2.5),
    noise=st.sampled_from([0.0, 1e-4, 1e-2]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=6, deadline=None)
def test_soft_rank_within_one_percent_for_power_laws_with_noise(decay, noise, seed):
    d = 384
    lam = np.arange(1, d + 1, dtype=np.float64) ** -decay + noise
    got = _ranks(_rotated(lam, seed), seed=seed)
    assert got["soft_rank"] == pytest.approx(soft_rank(lam), rel=0.01)


def test_seeded_and_deterministic():
    c = _rotated(validation_spectrum("power-law-1", 256))
    a, b = _ranks(c, seed=3), _ranks(c, seed=3)
    assert a == b
    assert _ranks(c, seed=4)["soft_rank"] != a["soft_rank"]  # the probes do depend on the seed


def test_quadrature_is_exact_for_low_degree_polynomials():
    # k Lanczos steps integrate polynomials of degree ≤ 2k − 1 exactly: tr B² from 2-step runs.
    c = _rotated(validation_spectrum("power-law-1", 200), seed=1)
    quad = quadrature(lambda v: c @ v, 200, probes=8, steps=2, deflate=200)  # the block spans everything
    assert quad.trace(lambda t: t**2).value == pytest.approx(float((c * c).sum()), rel=1e-10)
    assert quad.trace(lambda t: t**2).stderr == 0.0


def test_lanczos_stops_at_an_invariant_subspace():
    # A rank-3 matrix: from any start the Krylov space is exhausted after ≤ 4 steps, and the
    # quadrature of f then equals vᵀ f(A) v exactly.
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((50, 3)))[0]
    a = (u * [3.0, 2.0, 0.5]) @ u.T
    v = rng.standard_normal((50, 1))
    nodes, weights = lanczos(lambda x: a @ x, v, steps=20)
    assert nodes[0].size <= 4
    fa = (u * np.log1p([3.0, 2.0, 0.5])) @ u.T
    assert float(weights[0] @ np.log1p(np.clip(nodes[0], 0, None))) == pytest.approx(float(v[:, 0] @ fa @ v[:, 0]))


def test_rejects_a_traceless_matrix():
    with pytest.raises(ValueError, match="trace"):
        lanczos_ranks(lambda v: 0 * v, 4, 0.0)


@pytest.mark.parametrize("kind", ["flat", "power-law-1", "exponential", "low-rank+noise"])
def test_hard_rank_from_covariance_equals_the_eigenvalue_route(kind):
    lam = validation_spectrum(kind, 300)
    c = _rotated(lam, seed=2)
    assert hard_rank_from_covariance(c) == pytest.approx(hard_rank(np.linalg.eigvalsh(c).clip(0)), rel=1e-10)
    assert hard_rank_from_covariance(c) == pytest.approx(hard_rank(lam), rel=1e-10)
