"""The per-forward accumulation: exact against NumPy for every width (panelled GEMM), segment,
mask, fold and snapshot path."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capscale.probe.accumulate import (
    FOLD,
    Grouping,
    Scratch,
    WindowMoments,
    accumulate,
    panel_bounds,
    pooled,
)
from capscale.probe.sites import Site

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


def test_snapshot_then_continue_and_reset():
    d = 256
    xs = batches(1, 6, d)
    acc, scratch = WindowMoments(d, "cpu"), Scratch()
    for i, x in enumerate(xs):
        accumulate(x, Grouping(None, [0, x.shape[0]]), torch.float64, scratch, SITE, 0, None, acc)
        if i == 2:  # a snapshot mirrors the upper blocks; later batches still add correctly
            np.testing.assert_allclose(acc.moments().covariance().numpy(), cov(torch.cat(xs[:3]).numpy()), atol=1e-10)
    np.testing.assert_allclose(acc.moments().covariance().numpy(), cov(torch.cat(xs).numpy()), atol=1e-10)
    acc.reset()
    assert acc.count == 0 and not acc.scatter.any()


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
