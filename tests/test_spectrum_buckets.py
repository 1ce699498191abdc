"""HEAD/MID/TAIL frequency buckets and the one-pass bucketed accumulator."""

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capscale.spectrum import BucketedCovariance, FrequencyTable, StreamingCovariance


def _greedy_buckets(counts, cuts=(0.33, 0.67)):
    """Independent reference: the paper's cut positions, then whole tie groups by walking count levels.

    ``k`` = how many types (sorted by count) keep the cumulative mass within a cut; HEAD is
    every level down to type ``k_head``'s count (at least the top type), MID every further
    level down to type ``k_mid``'s count (``k_mid`` > ``k_head``), and a level tied with an
    earlier bucket stays there, so MID may be empty. Never-seen types are TAIL.
    """
    counts = np.asarray(counts)
    total, srt = counts.sum(), sorted(counts.tolist(), reverse=True)
    n, cum = len(srt), np.cumsum(srt)
    k_head = min(max(sum(1 for v in cum if v <= total * cuts[0]), 1), n - 1)
    k_mid = max(min(sum(1 for v in cum if v <= total * cuts[1]), n - 1), k_head + 1)
    out = np.full(counts.size, 2)
    for level in sorted(set(counts.tolist()), reverse=True):
        if level == 0:
            continue
        out[counts == level] = 0 if level >= srt[k_head - 1] else 1 if level >= srt[k_mid - 1] else 2
    return out


def test_never_seen_types_are_tail_even_when_every_seen_type_is_head():
    # issue 15.6: [4, 0, 4] gave [0, 1, 0] (the unseen type in MID)
    with pytest.warns(UserWarning, match="degenerate frequency table: bucket.s. mid"):
        ft = FrequencyTable([4, 0, 4])
    np.testing.assert_array_equal(ft.bucket(np.arange(3)), [0, 2, 0])
    assert ft.is_degenerate and ft.empty_buckets == ("mid",)
    assert ft.stats()["empty_buckets"] == ["mid"]
    # a tie group straddling the HEAD cut leaves MID empty rather than promoting the next level
    with pytest.warns(UserWarning, match="mid"):
        ft = FrequencyTable([5, 5, 3, 1])
    np.testing.assert_array_equal(ft.bucket(np.arange(4)), [0, 0, 2, 2])
    # never-seen types stay TAIL even where the MID cut falls on them
    with pytest.warns(UserWarning, match="mid"):
        np.testing.assert_array_equal(FrequencyTable([4, 0, 0]).bucket(np.arange(3)), [0, 2, 2])


def test_hand_worked_example_with_ties():
    # total 100: 40 | 20 20 | 10 5 5 ... (types 0..)
    counts = np.array([40, 20, 20, 10, 5, 5])
    ft = FrequencyTable(counts)
    # HEAD: 40/100 > 0.33 but at least one type -> {0}; MID: 40+20 = 0.60 ≤ 0.67,
    # +20 = 0.80 > 0.67 but equal counts share a bucket -> {1, 2}; TAIL: rest.
    np.testing.assert_array_equal(ft.bucket(np.arange(6)), [0, 1, 1, 2, 2, 2])
    s = ft.stats()["buckets"]
    assert [s[b]["num_types"] for b in ("head", "mid", "tail")] == [1, 2, 3]
    assert s["mid"]["share"] == pytest.approx(0.4)
    assert ft.head_min_count == 40 and ft.mid_min_count == 20


def test_paper_like_zipf_split():
    counts = (1e9 / np.arange(1, 50001) ** 1.1).astype(np.int64)
    counts[-200:] = 0  # never-seen types go to TAIL
    ft = FrequencyTable(counts)
    st_ = ft.stats()
    shares = [st_["buckets"][b]["share"] for b in ("head", "mid", "tail")]
    assert shares[0] <= 0.33 and shares[0] + shares[1] <= 0.67 + 1e-12
    assert (
        st_["buckets"]["head"]["num_types"] < st_["buckets"]["mid"]["num_types"] < st_["buckets"]["tail"]["num_types"]
    )
    assert np.all(ft.bucket(np.arange(49800, 50000)) == 2)


@given(st.lists(st.integers(0, 30), min_size=3, max_size=60), st.sampled_from([(0.33, 0.67), (0.2, 0.5), (0.5, 0.9)]))
@settings(max_examples=300, deadline=None)
def test_rule_matches_independent_reference(counts, cuts):
    if sum(counts) == 0:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # degenerate tables are part of the domain here
        ft = FrequencyTable(counts, cuts)
    b = ft.bucket(np.arange(len(counts)))
    np.testing.assert_array_equal(b, _greedy_buckets(counts, cuts))
    c = np.asarray(counts)
    # equal counts always share a bucket; buckets are ordered by count
    for i in range(len(c)):
        for j in range(len(c)):
            if c[i] == c[j]:
                assert b[i] == b[j]
            if c[i] > c[j]:
                assert b[i] <= b[j]
            if c[i] == 0:
                assert b[i] == 2  # never-seen types are TAIL
    assert (b == 0).any()
    assert ft.is_degenerate == (len(set(b.tolist())) < 3)


def test_from_token_ids_iterable_and_torch_lookup():
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 100, size=(4, 16)) for _ in range(5)]
    ft = FrequencyTable.from_token_ids(batches + [torch.tensor([[3, 3]])], vocab_size=128)
    expect = np.bincount(np.concatenate([b.ravel() for b in batches] + [np.array([3, 3])]), minlength=128)
    np.testing.assert_array_equal(ft.counts, expect)
    ids = torch.tensor([[0, 5], [99, 127]])
    out = ft.bucket(ids)
    assert isinstance(out, torch.Tensor) and out.shape == ids.shape
    np.testing.assert_array_equal(out.numpy(), ft.bucket(ids.numpy()))
    # host tensors go through NumPy: strided, narrow-int and 0-d ids keep their shape
    for other in (ids.T, ids[:, 1:], ids.to(torch.int16), ids[1, 0]):
        got = ft.bucket(other)
        assert torch.is_tensor(got) and got.shape == other.shape
        np.testing.assert_array_equal(got.numpy(), ft.bucket(other.numpy()))


def test_save_load_round_trip(tmp_path):
    ft = FrequencyTable(np.array([9, 7, 7, 3, 1, 0, 0]), cuts=(0.3, 0.6))
    path = ft.save(tmp_path / "freq.json")
    doc = json.loads(path.read_text())
    assert doc["stats"]["buckets"]["head"]["num_types"] == 1
    assert FrequencyTable.load(path) == ft
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a capscale frequency table"):
        FrequencyTable.load(tmp_path / "other.json")


@pytest.mark.parametrize("ids", [np.array([0, 7]), np.array([-1, 2]), torch.tensor([0, 7]), torch.tensor([-1])])
def test_out_of_range_ids_are_clear_errors(ids):
    ft = FrequencyTable(np.array([5, 4, 3, 2, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"token id out of range.*vocab_size 7"):
        ft.bucket(ids)


@pytest.mark.parametrize(
    "counts,cuts,match",
    [
        ([1, 2], (0.33, 0.67), ">= 3 token types"),
        ([0, 0, 0], (0.33, 0.67), "all zero"),
        ([1, -1, 2], (0.33, 0.67), "non-negative"),
        ([1.5, 1, 2], (0.33, 0.67), "integers"),
        ([1, 2, 3], (0.7, 0.3), "cuts"),
    ],
)
def test_bad_tables(counts, cuts, match):
    with pytest.raises(ValueError, match=match):
        FrequencyTable(np.array(counts), cuts)


def test_from_token_ids_range_check():
    with pytest.raises(ValueError, match="out of range"):
        FrequencyTable.from_token_ids([np.array([1, 2, 10])], vocab_size=5)


# -- bucketed accumulation ----------------------------------------------------


@given(st.integers(0, 2**31), st.integers(2, 8), st.lists(st.integers(1, 30), min_size=1, max_size=5))
@settings(max_examples=60, deadline=None)
def test_bucketed_pooled_equals_unbucketed(seed, d, sizes):
    rng = np.random.default_rng(seed)
    bucketed = BucketedCovariance(d)
    pooled = StreamingCovariance(d)
    rows, labels = [], []
    for n in sizes:
        x = rng.normal(size=(n, d)) * rng.random(d) + rng.normal(size=d) * 3
        b = rng.integers(0, 3, size=n)
        bucketed.update(x, b)
        pooled.update(x)
        rows.append(x)
        labels.append(b)
    x_all, b_all = np.concatenate(rows), np.concatenate(labels)
    total = bucketed.pooled()
    assert total.count == pooled.count == x_all.shape[0]
    if total.count >= 2:
        np.testing.assert_allclose(total.covariance(), pooled.covariance(), rtol=1e-10, atol=1e-12)
    for k, acc in enumerate(bucketed.buckets):
        sel = x_all[b_all == k]
        assert acc.count == sel.shape[0]
        if sel.shape[0] >= 2:
            np.testing.assert_allclose(acc.covariance(), np.cov(sel, rowvar=False), rtol=1e-10, atol=1e-12)


def test_bucketed_torch_with_mask_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 20, 6))
    b = rng.integers(0, 3, size=(3, 20))
    mask = rng.random((3, 20)) > 0.3
    acc = BucketedCovariance(6, device="cpu")
    acc.update(torch.tensor(x, dtype=torch.float32), torch.tensor(b), mask=torch.tensor(mask))
    xs = torch.tensor(x, dtype=torch.float32).double().numpy()
    for k in range(3):
        sel = xs[mask & (b == k)]
        np.testing.assert_allclose(acc.buckets[k].covariance().numpy(), np.cov(sel, rowvar=False), rtol=1e-10)
    states = acc.states()
    assert list(states) == ["all", "head", "mid", "tail"]
    assert states["all"].count == int(mask.sum())
    np.testing.assert_allclose(states["all"].covariance().numpy(), np.cov(xs[mask], rowvar=False), rtol=1e-10)


def test_bucketed_does_not_modify_input():
    x = np.random.default_rng(2).normal(size=(50, 4))
    x0 = x.copy()
    BucketedCovariance(4).update(x, np.arange(50) % 3)
    np.testing.assert_array_equal(x, x0)


def test_bucketed_bad_input():
    acc = BucketedCovariance(4)
    with pytest.raises(ValueError, match=r"bucket ids must lie in \[0, 3\)"):
        acc.update(np.ones((5, 4)), np.array([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"bucket ids must lie in \[0, 3\)"):
        acc.update(np.ones((5, 4)), np.array([0, 1, 2, 3, 0]), mask=np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="bucket ids of shape"):
        acc.update(np.ones((5, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="wrong dimension"):
        acc.update(np.ones((5, 3)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="empty batch"):
        acc.update(np.ones((0, 4)), np.zeros(0, dtype=int))


@pytest.mark.parametrize("device", [None, "cpu"])
def test_bucketed_non_finite_batch_changes_no_bucket(device):
    rng = np.random.default_rng(3)
    acc = BucketedCovariance(4, device=device)
    acc.update(rng.normal(size=(30, 4)), np.arange(30) % 3)
    before = [b.state_dict() for b in acc.buckets]
    x = rng.normal(size=(9, 4))
    x[8, 2] = np.nan  # the NaN row is in the TAIL bucket, sorted after HEAD and MID
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(x, np.arange(9) % 3)
    for b, st0 in zip(acc.buckets, before):
        assert b.count == st0["count"]
        np.testing.assert_array_equal(np.asarray(b.scatter), np.asarray(st0["scatter"]))


def test_bucketed_host_states_take_bf16_and_masks():
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(2, 40, 5)), dtype=torch.bfloat16)
    b = torch.tensor(rng.integers(0, 3, size=(2, 40)))
    mask = torch.tensor(rng.random((2, 40)) > 0.25)
    acc = BucketedCovariance(5).update(x, b, mask=mask)
    xs, bs, ms = x.double().numpy(), b.numpy(), mask.numpy()
    for k in range(3):
        np.testing.assert_allclose(acc.buckets[k].covariance(), np.cov(xs[ms & (bs == k)], rowvar=False), rtol=1e-10)
    pooled = StreamingCovariance(5).update(x, mask=mask)
    np.testing.assert_allclose(pooled.covariance(), np.cov(xs[ms], rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(acc.pooled().covariance(), pooled.covariance(), rtol=1e-10)
