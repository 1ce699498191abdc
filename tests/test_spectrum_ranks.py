"""Ranks and NerVE metrics: closed forms, invariants, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from capscale.spectrum import (
    asymmetry,
    early_enrichment,
    eigenvalues_from_covariance,
    hard_rank,
    hard_rank_from_covariance,
    js_divergence,
    renyi_rank,
    soft_rank,
    spectral_entropy,
)

spectra = arrays(
    np.float64,
    st.integers(2, 40),
    elements=st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False),
)


@pytest.mark.parametrize("d", [2, 7, 64])
def test_identity_spectrum_has_full_rank(d):
    lam = np.ones(d)
    for r in (soft_rank(lam), hard_rank(lam), renyi_rank(lam, 0.5), renyi_rank(lam, math.inf)):
        assert r == pytest.approx(d, rel=1e-12)
    assert asymmetry(lam) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k,d", [(1, 5), (3, 10), (17, 64)])
def test_rank_k_flat_spectrum_is_exactly_k(k, d):
    lam = np.zeros(d)
    lam[:k] = 2.5
    for alpha in (0.5, 1, 2, 3, math.inf):
        assert renyi_rank(lam, alpha) == pytest.approx(k, rel=1e-12)


def test_geometric_spectrum_matches_closed_form():
    d, q = 50, 0.8
    lam = q ** np.arange(d)
    # p_i = (1-q) q^i / (1-q^d); closed forms for Σp² and H.
    z = (1 - q**d) / (1 - q)
    sum_p2 = (1 - q ** (2 * d)) / (1 - q**2) / z**2
    mean_i = sum(i * q**i for i in range(d)) / z  # E[i] under p
    entropy = math.log(z) - mean_i * math.log(q)
    assert hard_rank(lam) == pytest.approx(1 / sum_p2, rel=1e-12)
    assert soft_rank(lam) == pytest.approx(math.exp(entropy), rel=1e-12)
    assert renyi_rank(lam, math.inf) == pytest.approx(z, rel=1e-12)


def test_power_law_spectrum_matches_closed_form():
    d, a = 200, 1.3
    i = np.arange(1, d + 1, dtype=np.float64)
    lam = i**-a
    z = sum(k**-a for k in range(1, d + 1))  # generalized harmonic numbers H(d, a)
    z2 = sum(k ** (-2 * a) for k in range(1, d + 1))
    z3 = sum(k ** (-3 * a) for k in range(1, d + 1))
    assert hard_rank(lam) == pytest.approx(z**2 / z2, rel=1e-12)
    # Rényi 3: (Σ p³)^(-1/2) = (z3 / z³)^(-1/2)
    assert renyi_rank(lam, 3) == pytest.approx((z3 / z**3) ** -0.5, rel=1e-12)
    h = math.log(z) + a * sum(math.log(k) * k**-a for k in range(1, d + 1)) / z
    assert spectral_entropy(lam) == pytest.approx(h, rel=1e-12)


@given(spectra)
@settings(max_examples=200, deadline=None)
def test_rank_ordering(lam):
    d = lam.size
    r_inf, r2, r1, r_half = (renyi_rank(lam, a) for a in (math.inf, 2, 1, 0.5))
    tol = 1e-9
    assert r_inf <= r2 * (1 + tol)
    assert r2 <= r1 * (1 + tol)
    assert r1 <= r_half * (1 + tol)
    assert r_half <= d * (1 + tol)
    assert r_inf >= 1 - tol
    assert asymmetry(lam) >= -tol


@given(spectra, st.floats(0.1, 10.0))
@settings(max_examples=100, deadline=None)
def test_renyi_continuous_in_alpha_and_matches_named_ranks(lam, _):
    assert renyi_rank(lam, 1.0) == pytest.approx(soft_rank(lam), rel=1e-12)
    assert renyi_rank(lam, 2.0) == pytest.approx(hard_rank(lam), rel=1e-10)
    assert renyi_rank(lam, 1 + 1e-7) == pytest.approx(soft_rank(lam), rel=1e-5)


@given(
    arrays(np.float64, st.tuples(st.integers(2, 12), st.integers(1, 30)), elements=st.floats(-10, 10)),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31),
)
@settings(max_examples=80, deadline=None)
def test_rotation_and_scale_invariance(a, scale, seed):
    d = a.shape[0]
    cov = a @ a.T + 1e-3 * np.eye(d)  # PSD, well away from the clamp floor
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    rotated = scale * (q @ cov @ q.T)
    e0, e1 = eigenvalues_from_covariance(cov), eigenvalues_from_covariance(rotated)
    for f in (soft_rank, hard_rank, lambda x: renyi_rank(x, math.inf), early_enrichment):
        assert f(e1) == pytest.approx(f(e0), rel=1e-7)
    assert hard_rank_from_covariance(rotated) == pytest.approx(hard_rank(e0), rel=1e-7)


@given(arrays(np.float64, st.tuples(st.integers(2, 20), st.integers(2, 50)), elements=st.floats(-5, 5)))
@settings(max_examples=80, deadline=None)
def test_hard_rank_from_covariance_equals_eigvalsh(a):
    cov = a @ a.T
    if np.trace(cov) <= 1e-6:
        return
    eigs = np.clip(np.linalg.eigvalsh(cov), 0, None)
    assert hard_rank_from_covariance(cov) == pytest.approx(hard_rank(eigs), rel=1e-9)


def test_hard_rank_from_covariance_torch_on_device():
    torch = pytest.importorskip("torch")
    c = torch.diag(torch.tensor([3.0, 1.0, 1.0]))
    assert hard_rank_from_covariance(c) == pytest.approx(25 / 11, rel=1e-12)


def test_early_enrichment_extremes():
    d = 100
    assert early_enrichment(np.ones(d)) == pytest.approx(1 / d, rel=1e-12)
    spike = np.zeros(d)
    spike[0] = 1
    assert early_enrichment(spike) == pytest.approx(1.0)
    # order of the input does not matter
    lam = np.random.default_rng(0).random(d)
    assert early_enrichment(lam) == pytest.approx(early_enrichment(lam[::-1]))


def test_js_divergence_properties():
    a = np.array([4.0, 2.0, 1.0])
    assert js_divergence(a, 7 * a) == pytest.approx(0.0, abs=1e-15)
    # zero padding: a rank-1 spectrum vs a flat 2-mode spectrum, analytic value
    p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    m = (p + q) / 2
    kl = lambda x, y: sum(xi * math.log(xi / yi) for xi, yi in zip(x, y) if xi > 0)  # noqa: E731
    expect = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert js_divergence([1.0], [1.0, 1.0]) == pytest.approx(expect, rel=1e-12)
    assert js_divergence(a, [1.0, 1.0, 1.0, 1.0]) == pytest.approx(js_divergence([1.0] * 4, a))
    assert 0 < js_divergence([1.0], np.ones(50)) <= math.log(2)


@pytest.mark.parametrize(
    "bad,match",
    [
        ([], "empty spectrum"),
        ([1.0, np.nan], "NaN or Inf"),
        ([1.0, np.inf], "NaN or Inf"),
        ([1.0, -0.5], "non-negative"),
        ([0.0, 0.0], "all eigenvalues are zero"),
    ],
)
def test_bad_spectra_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        soft_rank(bad)


@pytest.mark.parametrize("alpha", [0, -1, float("nan")])
def test_bad_renyi_order(alpha):
    with pytest.raises(ValueError, match="alpha"):
        renyi_rank([1.0, 2.0], alpha)


def test_hard_rank_from_covariance_bad_input():
    with pytest.raises(ValueError, match="square"):
        hard_rank_from_covariance(np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        hard_rank_from_covariance(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="no variance"):
        hard_rank_from_covariance(np.zeros((3, 3)))


def test_hard_rank_of_a_spectrum_whose_sum_overflows_is_still_computed():
    # every eigenvalue finite, Σλ = inf in float64: the hard rank scales by λ_max first, so it is exact
    with np.errstate(over="ignore"):
        assert hard_rank(np.array([1e308, 1e308, 0.0])) == pytest.approx(2.0)
