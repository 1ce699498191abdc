"""StreamingCovariance: exactness of streaming and merging, backends, state, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capscale.spectrum import (
    IndefiniteCovarianceError,
    InsufficientSamplesError,
    NonFiniteError,
    StreamingCovariance,
    clamp_spectrum,
    eigenvalues_from_covariance,
    hard_rank,
    soft_rank,
)
from capscale.spectrum.covariance import SERIAL_EIG_MAX_DIM


def _data(seed, n, d, offset=5.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * rng.random(d)  # anisotropic, correlated
    return rng.normal(size=(n, d)) @ mix + offset * rng.normal(size=d)  # far-from-zero mean


def _reference_cov(x):
    return np.cov(x, rowvar=False, ddof=1)


def test_matches_numpy_cov_and_is_unbiased():
    x = _data(0, 300, 12)
    acc = StreamingCovariance(12).update(x)
    assert acc.count == 300
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.covariance(), _reference_cov(x), rtol=1e-11, atol=1e-12)


@given(
    st.integers(0, 2**31),
    st.integers(2, 9),
    st.lists(st.integers(1, 40), min_size=1, max_size=8),
    st.permutations(range(8)),
)
@settings(max_examples=60, deadline=None)
def test_streaming_equals_one_pass_equals_any_merge_order(seed, d, sizes, perm):
    x = _data(seed, sum(sizes), d)
    if sum(sizes) < 2:
        return
    one_pass = StreamingCovariance(d).update(x)
    chunks = np.split(x, np.cumsum(sizes)[:-1])
    streamed = StreamingCovariance(d)
    for c in chunks:
        streamed.update(c)
    parts = [StreamingCovariance(d).update(c) for c in chunks]
    order = [i for i in perm if i < len(parts)]
    merged = StreamingCovariance(d)
    for i in order:
        merged.merge(parts[i])
    # tree merge: pairwise reduction, as an all-reduce would do
    level = [StreamingCovariance(d).update(c) for c in chunks]
    while len(level) > 1:
        level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    ref = _reference_cov(x)
    scale = np.abs(ref).max()
    for acc in (one_pass, streamed, merged, level[0]):
        assert acc.count == x.shape[0]
        np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(acc.covariance(), ref, rtol=0, atol=1e-10 * scale)


def test_merge_leaves_other_unchanged_and_empty_merges_are_identity():
    a = StreamingCovariance(4).update(_data(1, 10, 4))
    b = StreamingCovariance(4).update(_data(2, 10, 4))
    b_state = b.state_dict()
    a.merge(b)
    np.testing.assert_array_equal(b.scatter, b_state["scatter"])
    before = a.covariance().copy()
    a.merge(StreamingCovariance(4))
    np.testing.assert_array_equal(a.covariance(), before)
    fresh = StreamingCovariance(4).merge(b)
    fresh.update(_data(3, 5, 4))  # must not write through into b
    np.testing.assert_array_equal(b.scatter, b_state["scatter"])


def test_leading_dims_are_flattened_and_mask_drops_rows():
    x = _data(3, 2 * 7, 6).reshape(2, 7, 6)
    mask = np.ones((2, 7), dtype=bool)
    mask[0, 5:] = False
    mask[1, 3:] = False
    acc = StreamingCovariance(6).update(x, mask=mask)
    kept = x[mask]
    assert acc.count == kept.shape[0] == 8
    np.testing.assert_allclose(acc.covariance(), _reference_cov(kept), rtol=1e-11)
    # a mask that keeps nothing is a no-op
    acc.update(x, mask=np.zeros((2, 7), dtype=bool))
    assert acc.count == 8


def test_input_is_never_modified():
    x = _data(4, 50, 5)
    x_copy = x.copy()
    StreamingCovariance(5).update(x)
    np.testing.assert_array_equal(x, x_copy)
    t = torch.from_numpy(x.copy())  # float64 CPU tensor: zero-copy into NumPy
    t_copy = t.clone()
    StreamingCovariance(5).update(t)
    StreamingCovariance(5, device="cpu").update(t)
    assert torch.equal(t, t_copy)


def test_torch_inputs_and_torch_backend_match_numpy():
    x = _data(5, 200, 8)
    ref = StreamingCovariance(8).update(x)
    t32 = torch.tensor(x, dtype=torch.float32)
    from_torch = StreamingCovariance(8).update(t32)
    on_torch = StreamingCovariance(8, device="cpu").update(t32[:120]).update(t32[120:])
    assert isinstance(on_torch.scatter, torch.Tensor) and on_torch.scatter.dtype == torch.float64
    x32 = t32.double().numpy()
    np.testing.assert_allclose(from_torch.covariance(), _reference_cov(x32), rtol=1e-10)
    np.testing.assert_allclose(on_torch.covariance().numpy(), _reference_cov(x32), rtol=1e-10)
    np.testing.assert_allclose(on_torch.eigenvalues(), from_torch.eigenvalues(), rtol=1e-9)
    # cross-backend merge and state round trip
    mixed = StreamingCovariance(8).update(x[:50]).merge(StreamingCovariance(8, device="cpu").update(x[50:]))
    np.testing.assert_allclose(mixed.covariance(), ref.covariance(), rtol=1e-11)


def test_float32_accumulation_error_is_bounded():
    x = _data(6, 4000, 32, offset=20.0)  # large mean: the case naive sums get wrong
    c64 = StreamingCovariance(32).update(x).covariance()
    acc32 = StreamingCovariance(32, dtype="float32")
    for chunk in np.split(x, 8):
        acc32.update(chunk)
    c32 = acc32.covariance()
    rel = np.abs(c32 - c64).max() / np.abs(c64).max()
    assert rel < 1e-5  # centred per batch: error stays near fp32 epsilon, not eps·mean²/var
    e64 = eigenvalues_from_covariance(c64)
    e32 = eigenvalues_from_covariance(c32)
    assert abs(soft_rank(e32) / soft_rank(e64) - 1) < 1e-4
    assert abs(hard_rank(e32) / hard_rank(e64) - 1) < 1e-4


def test_state_dict_round_trip_and_torch_save(tmp_path):
    acc = StreamingCovariance(5, device="cpu").update(_data(7, 30, 5))
    path = tmp_path / "state.pt"
    torch.save(acc.state_dict(), path)
    back = StreamingCovariance.from_state_dict(torch.load(path, weights_only=True), device="cpu")
    assert back.count == acc.count
    assert torch.equal(back.scatter, acc.scatter)
    np_back = StreamingCovariance.from_state_dict(acc.state_dict())  # onto the NumPy backend
    np.testing.assert_array_equal(np_back.scatter, acc.scatter.numpy())
    more = _data(8, 9, 5)
    np.testing.assert_allclose(np_back.update(more).covariance(), back.update(more).covariance().numpy())


def test_state_dict_validation():
    good = StreamingCovariance(3).update(_data(9, 10, 3)).state_dict()
    with pytest.raises(ValueError, match="missing"):
        StreamingCovariance.from_state_dict({"dim": 3})
    with pytest.raises(ValueError, match="inconsistent"):
        StreamingCovariance.from_state_dict({**good, "mean": np.zeros(4)})
    with pytest.raises(NonFiniteError):
        StreamingCovariance.from_state_dict({**good, "scatter": np.full((3, 3), np.nan)})


def test_eigenvalues_descending_and_clamped():
    x = _data(10, 5, 8)  # N-1 = 4 < D: four exact zeros up to round-off
    eigs = StreamingCovariance(8).update(x).eigenvalues()
    assert np.all(np.diff(eigs) <= 0)
    assert eigs.min() >= 1e-12
    assert np.sum(eigs > 1e-9) == 4


# -- bad input: each a clear error naming the problem -------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_rejected_and_state_intact(bad):
    acc = StreamingCovariance(3).update(_data(11, 10, 3))
    before = acc.state_dict()
    x = _data(12, 4, 3)
    x[2, 1] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        acc.update(x)
    assert acc.count == before["count"]
    np.testing.assert_array_equal(acc.scatter, before["scatter"])
    with pytest.raises(NonFiniteError):
        StreamingCovariance(3, device="cpu").update(torch.tensor(x))


def test_wrong_dimension():
    with pytest.raises(ValueError, match="wrong dimension: rows have D=4, accumulator has D=3"):
        StreamingCovariance(3).update(np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\]"):
        StreamingCovariance(3).update(np.ones(3))
    with pytest.raises(ValueError, match="cannot merge D=4 into D=3"):
        StreamingCovariance(3).merge(StreamingCovariance(4))
    with pytest.raises(ValueError, match="mask has 4 entries for 5 rows"):
        StreamingCovariance(3).update(np.ones((5, 3)), mask=np.ones(4, dtype=bool))


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        StreamingCovariance(3).update(np.ones((0, 3)))


def test_dimension_one_is_rejected():
    with pytest.raises(ValueError, match="dim must be >= 2"):
        StreamingCovariance(1)


def test_all_zero_variance():
    acc = StreamingCovariance(4).update(np.full((20, 4), 3.0))
    with pytest.raises(ValueError, match="all-zero variance"):
        acc.eigenvalues()


def test_too_few_samples():
    acc = StreamingCovariance(4).update(np.ones((1, 4)))
    with pytest.raises(InsufficientSamplesError, match="at least 2 samples"):
        acc.covariance()
    rec = acc.summary()
    assert rec["sampling_status"] == "insufficient" and np.isnan(rec["soft_rank"])


def test_materially_indefinite_matrix():
    with pytest.raises(IndefiniteCovarianceError, match="materially indefinite"):
        eigenvalues_from_covariance(np.diag([1.0, -0.01, 0.5]))
    # round-off sized negatives are clamped, not errors
    eigs = eigenvalues_from_covariance(np.diag([1.0, -1e-9, 0.5]))
    assert eigs[-1] == 1e-12


def test_bad_dtype():
    with pytest.raises(ValueError, match="float64 or float32"):
        StreamingCovariance(3, dtype="int32")


def test_scatter_is_symmetric_between_updates_and_accumulators_share_no_rows():
    # NumPy batches update one triangle in place and share one scratch buffer: interleave
    # accumulators of different D and read the state between batches.
    rng = np.random.default_rng(5)
    a, b = StreamingCovariance(7), StreamingCovariance(3)
    xa, xb = [], []
    for n in (5, 40, 2, 17):
        xa.append(rng.normal(size=(n, 7)) + 4)
        xb.append(rng.normal(size=(n + 3, 3)) - 2)
        a.update(xa[-1])
        b.update(xb[-1])
        np.testing.assert_array_equal(a.scatter, a.scatter.T)
        np.testing.assert_allclose(a.covariance(), np.cov(np.concatenate(xa), rowvar=False), rtol=1e-12)
        np.testing.assert_allclose(b.covariance(), np.cov(np.concatenate(xb), rowvar=False), rtol=1e-12)


@pytest.mark.parametrize("dim", [64, SERIAL_EIG_MAX_DIM + 8])  # NumPy on one thread; torch above
def test_host_tensors_decompose_like_arrays_on_either_path(dim):
    x = np.random.default_rng(dim).standard_normal((2 * dim, dim)) * np.linspace(0.1, 3, dim)
    cov = np.cov(x.T)
    want = eigenvalues_from_covariance(cov)
    got = eigenvalues_from_covariance(torch.from_numpy(cov).float().requires_grad_())
    np.testing.assert_allclose(got, eigenvalues_from_covariance(cov.astype(np.float32)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bad = torch.from_numpy(cov.copy())
    bad[0, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        eigenvalues_from_covariance(bad)
    with pytest.raises(ValueError, match="square"):
        eigenvalues_from_covariance(torch.zeros(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("dim", [64, SERIAL_EIG_MAX_DIM + 8])
@pytest.mark.parametrize("as_torch", [False, True])
def test_upper_triangle_and_divisor(dim, as_torch):
    # a scatter read by its upper triangle (the lower one stale), divided on its eigenvalues:
    # the spectrum of the full scatter / (n - 1)
    x = np.random.default_rng(dim).standard_normal((2 * dim, dim)) * np.linspace(0.1, 3, dim)
    centred = x - x.mean(0)
    scatter = centred.T @ centred
    want = eigenvalues_from_covariance(_reference_cov(x))
    stale = np.triu(scatter) + np.tril(np.random.default_rng(1).standard_normal((dim, dim)) * 1e3, -1)
    given = torch.from_numpy(stale) if as_torch else stale
    got = eigenvalues_from_covariance(given, divisor=len(x) - 1, upper=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * want[0])
    with pytest.raises(IndefiniteCovarianceError):  # the lower triangle is not read as if symmetric
        eigenvalues_from_covariance(given, divisor=len(x) - 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e-9, 1e3, allow_nan=False), min_size=2, max_size=40).filter(lambda v: max(map(abs, v)) > 0))
def test_clamp_of_an_ascending_spectrum_is_the_sorting_clamp(values):
    # eigvalsh returns ascending eigenvalues: reversed instead of sorted, with the same result
    raw = np.sort(np.asarray(values))
    try:
        want = clamp_spectrum(raw)
    except IndefiniteCovarianceError:
        with pytest.raises(IndefiniteCovarianceError):
            clamp_spectrum(raw, ascending=True)
        return
    got = clamp_spectrum(raw, ascending=True)
    np.testing.assert_array_equal(got, want)
    assert got.flags.c_contiguous and got.dtype == np.float64


@pytest.mark.parametrize("as_torch", [False, True])
def test_check_finite_off_still_refuses_non_finite_eigenvalues(as_torch):
    # the caller vouches for finiteness (a scatter with a finite diagonal); a NaN that gets
    # into LAPACK anyway comes out of it as an error, not as a spectrum
    a = np.diag([3.0, 2.0, 1.0])
    a[2, 0] = np.nan  # read with UPLO="L"
    given = torch.from_numpy(a) if as_torch else a
    with pytest.raises(NonFiniteError):
        eigenvalues_from_covariance(given, check_finite=False)
    np.testing.assert_array_equal(eigenvalues_from_covariance(given, upper=True, check_finite=False), [3.0, 2.0, 1.0])
