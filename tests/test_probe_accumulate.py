"""The per-forward accumulation: exact against NumPy for every width (panelled GEMM), segment,
mask, fold and snapshot path."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capscale.probe.accumulate import (
    FOLD,
    PARTIAL_FOLD,
    Grouping,
    Scratch,
    WindowMoments,
    accumulate,
    panel_bounds,
    pooled,
)
from capscale.probe.sites import Site
from capscale.spectrum._torch import _group_host, group_rows

SITE = Site(0, "pre", "m", None, "output")


def batches(seed, n, d, rows=(5, 40)):
    """Correlated rows with a far-from-zero mean that drifts from batch to batch."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
    out = []
    for k in range(n):
        r = int(torch.randint(rows[0], rows[1], (1,), generator=g))
        out.append(torch.randn(r, d, generator=g, dtype=torch.float64) @ mix + 5 + 0.5 * k)
    return out


def cov(x):
    return np.cov(x, rowvar=False, ddof=1)


def test_panel_layouts():
    assert panel_bounds(5000, 64) == [0, 64] and panel_bounds(100, 512) == [0, 512]
    assert panel_bounds(500, 128) == [0, 64, 128] and panel_bounds(5000, 200) == [0, 100, 200]
    assert panel_bounds(1024, 300) == [0, 75, 150, 225, 300]


@pytest.mark.parametrize("d", [3, 130, 256, 301])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pooled_accumulation_matches_numpy(d, dtype):
    # crosses two folds of the between-means term; batch sizes mix 1, 2 and 4 panels
    xs = batches(d, 2 * FOLD + 3, d, rows=(5, 1300) if d > 3 else (5, 40))
    acc, scratch = WindowMoments(d, "cpu"), Scratch()
    for x in xs:
        x = x.to(dtype)
        accumulate(x.reshape(1, -1, d), Grouping(None, [0, x.shape[0]]), dtype, scratch, SITE, 0, None, acc)
    m = acc.moments()
    ref_x = torch.cat([x.to(dtype) for x in xs]).double().numpy()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert m.count == ref_x.shape[0]
    np.testing.assert_allclose(m.mean.numpy(), ref_x.mean(0), rtol=tol)
    c = m.covariance().numpy()
    np.testing.assert_allclose(c, cov(ref_x), rtol=0, atol=tol * np.abs(cov(ref_x)).max())
    np.testing.assert_allclose(c, c.T, rtol=0, atol=1e-14 * np.abs(c).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_snapshot_then_continue_and_reset(dtype):
    # float32 GEMMs sum into a float32 partial (PARTIAL_FOLD batches) that every read flushes
    d, n = 256, PARTIAL_FOLD + 5
    xs = [x.to(dtype) for x in batches(1, n, d)]
    acc, scratch = WindowMoments(d, "cpu"), Scratch()
    atol = 1e-10 if dtype == torch.float64 else 2e-6 * np.abs(cov(torch.cat(xs).double().numpy())).max()
    for i, x in enumerate(xs):
        accumulate(x, Grouping(None, [0, x.shape[0]]), dtype, scratch, SITE, 0, [acc], None)
        if i in (2, PARTIAL_FOLD + 1):  # mid-partial: a copy and a snapshot see every batch so far
            ref = cov(torch.cat(xs[: i + 1]).double().numpy())
            np.testing.assert_allclose(acc.copy().moments().covariance().numpy(), ref, atol=atol)
            np.testing.assert_allclose(acc.moments().covariance().numpy(), ref, atol=atol)
    np.testing.assert_allclose(acc.moments().covariance().numpy(), cov(torch.cat(xs).double().numpy()), atol=atol)
    acc.reset()
    assert acc.count == 0 and not acc.moments().scatter.any()  # the old values are not read again
    accumulate(xs[0], Grouping(None, [0, xs[0].shape[0]]), dtype, scratch, SITE, 0, [acc], None)
    np.testing.assert_allclose(acc.moments().covariance().numpy(), cov(xs[0].double().numpy()), atol=atol)


@pytest.mark.parametrize("route", ["rows-f64", "rows-f32", "add", "one-row"])
def test_a_reset_state_is_not_cleared_but_reads_as_fresh(route):
    # reset() leaves the old D×D values in place; the next write overwrites them (a copy,
    # or a GEMM with beta = 0): a reused accumulator equals a new one, whatever the route
    d = 40
    old = batches(7, 5, d)
    xs = batches(8, PARTIAL_FOLD + 3, d, rows=(1, 2) if route == "one-row" else (5, 40))
    dtype = torch.float32 if route == "rows-f32" else torch.float64
    reused, fresh = WindowMoments(d, "cpu"), WindowMoments(d, "cpu")
    for x in old:
        accumulate(x, Grouping(None, [0, x.shape[0]]), torch.float64, Scratch(), SITE, 0, [reused], None)
    reused.moments()
    reused.reset()
    assert reused.scatter.abs().max() > 0  # nothing was cleared
    for acc in (reused, fresh):
        for x in xs:
            if route == "add":
                mean = x.mean(0)
                acc.add(x.shape[0], mean, (x - mean).T @ (x - mean))
            else:
                accumulate(x.to(dtype), Grouping(None, [0, x.shape[0]]), dtype, Scratch(), SITE, 0, [acc], None)
    a, b = reused.moments(), fresh.moments()
    assert a.count == b.count == sum(x.shape[0] for x in xs)
    np.testing.assert_allclose(a.scatter.numpy(), b.scatter.numpy(), rtol=1e-13, atol=1e-13 * b.scatter.abs().max())
    ref = cov(torch.cat(xs).to(dtype).double().numpy())
    np.testing.assert_allclose(a.covariance().numpy(), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    reused.reset()  # an empty window after a full one reads as zeros
    assert reused.moments().count == 0 and not reused.moments().scatter.any()


def test_float64_gemm_accumulates_in_the_state_exactly_as_added_batches():
    # add_rows (the GEMM adds into the state) == each batch's scatter formed, then added
    d = 130
    xs = batches(3, 12, d, rows=(1, 300))
    direct, added = WindowMoments(d, "cpu"), WindowMoments(d, "cpu")
    for x in xs:
        accumulate(x, Grouping(None, [0, x.shape[0]]), torch.float64, Scratch(), SITE, 0, [direct], None)
        mean = x.mean(0)
        added.add(x.shape[0], mean, (x - mean).T @ (x - mean))
    a, b = direct.moments(), added.moments()
    assert a.count == b.count
    np.testing.assert_allclose(a.scatter.numpy(), b.scatter.numpy(), rtol=0, atol=1e-12 * b.scatter.abs().max())


def test_float32_partial_stays_within_one_gemm_of_float64():
    # the float32 partial's rounding is that of a GEMM over PARTIAL_FOLD batches: against the
    # float64 result, over many folds, no worse than each batch's float32 scatter added in float64
    d = 64
    xs = [x.float() for x in batches(5, 6 * PARTIAL_FOLD, d, rows=(200, 400))]
    f32, f64, per_batch = WindowMoments(d, "cpu"), WindowMoments(d, "cpu"), WindowMoments(d, "cpu")
    for x in xs:
        accumulate(x, Grouping(None, [0, x.shape[0]]), torch.float32, Scratch(), SITE, 0, [f32], None)
        accumulate(x.double(), Grouping(None, [0, x.shape[0]]), torch.float64, Scratch(), SITE, 0, [f64], None)
        mean = x.mean(0)
        per_batch.add(x.shape[0], mean, ((x - mean).T @ (x - mean)).double())
    ref = f64.moments().scatter

    def err(acc):
        return float((acc.moments().scatter - ref).norm() / ref.norm())

    assert err(f32) < 1.5 * err(per_batch) and err(f32) < 1e-7, (err(f32), err(per_batch))


@given(st.integers(0, 10_000), st.lists(st.integers(0, 3), min_size=1, max_size=60))
@settings(max_examples=60, deadline=None)
def test_segments_masks_and_pooled_merge(seed, labels):
    d = 6
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), d, generator=g, dtype=torch.float64) * 3 + torch.arange(d)
    lab = torch.tensor(labels)  # 3 = masked out
    order = torch.argsort(lab, stable=True)
    counts = torch.bincount(lab, minlength=4)[:3]
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    grouping = Grouping(order[: bounds[-1]], bounds)
    segs = [WindowMoments(d, "cpu") for _ in range(3)]
    total = WindowMoments(d, "cpu")
    accumulate(x, grouping, torch.float64, Scratch(), SITE, 0, segs, total)
    for b in range(3):
        rows = x[lab == b].numpy()
        assert segs[b].count == len(rows)
        if len(rows) >= 2:
            np.testing.assert_allclose(segs[b].moments().covariance().numpy(), cov(rows), atol=1e-9)
    kept = x[lab < 3].numpy()
    assert total.count == len(kept)
    if len(kept) >= 2:
        np.testing.assert_allclose(total.moments().covariance().numpy(), cov(kept), atol=1e-9)
        merged = pooled([s.moments() for s in segs])
        np.testing.assert_allclose(merged.covariance().numpy(), cov(kept), atol=1e-9)
        assert merged.count == len(kept)


def test_bfloat16_rows_are_widened_not_written():
    x = torch.randn(4, 8, 130).to(torch.bfloat16)
    before = x.clone()
    acc = WindowMoments(130, "cpu")
    accumulate(x, Grouping(None, [0, 32]), torch.float32, Scratch(), SITE, 0, None, acc)
    assert torch.equal(x, before)  # the model's tensor is never centred in place
    np.testing.assert_allclose(acc.moments().covariance().numpy(), cov(x.double().reshape(-1, 130).numpy()), atol=1e-5)


def test_upper_triangle_moments_and_their_merge():
    # a window's states handed over unmirrored (upper=True) still merge and read exactly
    d = 130
    xs = batches(7, 3, d, rows=(150, 300))
    accs = [WindowMoments(d, "cpu") for _ in xs]
    for acc, x in zip(accs, xs):
        accumulate(x, Grouping(None, [0, x.shape[0]]), torch.float64, Scratch(), SITE, 0, [acc], None)
    parts = [a.moments(full=False) for a in accs]
    assert all(p.upper for p in parts)
    assert not torch.equal(parts[0].scatter, parts[0].scatter.T)  # the lower triangle was not mirrored
    for p, x in zip(parts, xs):
        c = p.covariance()
        assert torch.equal(c, c.T)
        np.testing.assert_allclose(c.numpy(), cov(x.numpy()), atol=1e-10)
    merged = pooled(parts)
    assert merged.upper and merged.count == sum(len(x) for x in xs)
    np.testing.assert_allclose(merged.covariance().numpy(), cov(torch.cat(xs).numpy()), atol=1e-10)
    full = accs[0].moments()
    assert not full.upper and torch.equal(full.scatter, full.scatter.T)


@given(st.lists(st.integers(0, 2), min_size=1, max_size=80), st.booleans(), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_host_grouping_equals_the_device_one(labels, masked, seed):
    # group_rows runs in NumPy for host tensors; on a device in torch: the same rows, order, bounds
    ids = torch.tensor(labels, dtype=torch.int8)
    keep = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) > 0.3 if masked else None
    host = _group_host(keep, ids, 3)
    b = ids.long() if keep is None else torch.where(keep, ids.long(), 3)
    order = torch.argsort(b, stable=True)
    bounds = [0, *torch.cumsum(torch.bincount(b, minlength=4)[:3], 0).tolist()]
    assert host.bounds == bounds and torch.equal(host.index, order[: bounds[-1]])
    assert torch.equal(group_rows(len(labels), keep, ids, 3).index, host.index)
