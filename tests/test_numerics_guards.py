"""Issue 15.7–15.8: batches that would poison a state are refused before it changes (huge finite
values, complex input), and tiny-but-non-zero activations are measured, never a stopped run."""

import warnings

import numpy as np
import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.spectrum import (
    BucketedCovariance,
    NonFiniteError,
    StreamingCovariance,
    eigenvalues_from_covariance,
    hard_rank,
    soft_rank,
)

torch.set_num_threads(1)


def _rows(seed, n=40, d=5):
    return np.random.default_rng(seed).normal(size=(n, d)) @ np.diag([3.0, 2.0, 1.0, 0.5, 0.25])


def _state(acc):
    s = acc.state_dict()
    return s["count"], np.asarray(s["mean"]).copy(), np.asarray(s["scatter"]).copy()


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("huge", [1e200, -1e160, 1e155])
def test_overflowing_batch_is_refused_and_the_state_survives(device, huge):
    acc = StreamingCovariance(5, device=device).update(_rows(0))
    before = _state(acc)
    bad = _rows(1, n=8)
    bad[3, 2] = huge  # finite, but its square (times the rows) overflows float64
    with pytest.raises(NonFiniteError, match="too large"):
        acc.update(bad if device is None else torch.tensor(bad))
    count, mean, scatter = _state(acc)
    assert count == before[0]
    np.testing.assert_array_equal(mean, before[1])
    np.testing.assert_array_equal(scatter, before[2])
    ref = StreamingCovariance(5).update(_rows(0)).summary()
    assert acc.summary()["soft_rank"] == pytest.approx(ref["soft_rank"], rel=1e-12)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_overflowing_batch_changes_no_bucket(device):
    acc = BucketedCovariance(5, device=device)
    x, b = _rows(2, n=60), np.arange(60) % 3
    acc.update(x, b)
    before = [_state(s) for s in acc.buckets]
    bad = _rows(3, n=12)
    bad[-1, 0] = 1e200  # in the last bucket: the earlier ones must not have been updated either
    with pytest.raises(NonFiniteError, match="too large"):
        acc.update(bad if device is None else torch.tensor(bad), np.r_[np.zeros(11, int), 2])
    for s, (count, _mean, scatter) in zip(acc.buckets, before):
        assert _state(s)[0] == count
        np.testing.assert_array_equal(_state(s)[2], scatter)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_complex_input_is_refused_without_a_warning(device):
    acc = StreamingCovariance(5, device=device).update(_rows(4))
    before = _state(acc)
    z = _rows(5, n=6) + 1j
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today: a ComplexWarning and the imaginary part dropped
        with pytest.raises(ValueError, match="complex"):
            acc.update(z if device is None else torch.tensor(z))
        with pytest.raises(ValueError, match="complex"):
            BucketedCovariance(5, device=device).update(
                z if device is None else torch.tensor(z), np.zeros(6, dtype=np.int64)
            )
    assert _state(acc)[0] == before[0]
    np.testing.assert_array_equal(_state(acc)[2], before[2])


def test_tiny_spectrum_has_the_ranks_of_its_scaled_up_self():
    x = _rows(6, n=200)
    scale = 2.0**-30  # exact in binary: the covariance scales by 2**-60 (λ_max ~ 1e-17)
    big, tiny = StreamingCovariance(5).update(x), StreamingCovariance(5).update(x * scale)
    e_big, e_tiny = big.eigenvalues(), tiny.eigenvalues()
    assert e_tiny[0] < 1e-12  # today: "all-zero variance" ValueError
    np.testing.assert_allclose(e_tiny / scale**2, e_big, rtol=1e-10)
    assert soft_rank(e_tiny) == pytest.approx(soft_rank(e_big), rel=1e-10)
    assert hard_rank(e_tiny) == pytest.approx(hard_rank(e_big), rel=1e-10)
    # the floor is relative below λ_max = 1e-6 and the paper's absolute 1e-12 above it
    assert eigenvalues_from_covariance(np.diag([1e-14, 0.0]))[-1] == pytest.approx(1e-20)
    assert eigenvalues_from_covariance(np.diag([1e-6, 0.0]))[-1] == 1e-12
    assert eigenvalues_from_covariance(np.diag([3.0, 0.0]))[-1] == 1e-12
    with pytest.raises(ValueError, match="all-zero variance"):
        eigenvalues_from_covariance(np.zeros((3, 3)))


def _measure(model, ids):
    probe = capscale.attach(model, every=1, dtype=torch.float64)
    model(ids)
    probe.step()  # closes the window: today SpectrumError "all-zero variance" for layer 1
    df = probe.compute()
    probe.close()
    return df.set_index(["layer", "site", "bucket"]).sort_index()


def test_tiny_activations_do_not_stop_the_probe_and_are_flagged():
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))  # 32 rows > D = 12
    normal, tiny = toy(d=16).double(), toy(d=16).double()  # pre of full rank D = 12: no null direction
    with torch.no_grad():  # layer 1's pre activations scaled by 2**-30, its post (relu²) by 2**-60
        tiny.blocks[1].mlp.c_fc.weight.mul_(2.0**-30)
        tiny.blocks[1].mlp.c_fc.bias.mul_(2.0**-30)
        normal.blocks[1].mlp.c_fc.weight.copy_(tiny.blocks[1].mlp.c_fc.weight * 2.0**30)
        normal.blocks[1].mlp.c_fc.bias.copy_(tiny.blocks[1].mlp.c_fc.bias * 2.0**30)
    a, b = _measure(normal, ids), _measure(tiny, ids)
    assert (a.spectrum_status == "ok").all()
    assert list(b.loc[1].spectrum_status) == ["tiny_variance", "tiny_variance"]
    assert (b.loc[0].spectrum_status == "ok").all()
    # with no eigenvalue near the floor, ranks are scale-free: the tiny layer's equal the normal one's
    for col in ("soft_rank", "hard_rank", "renyi_rank_inf"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-9)
