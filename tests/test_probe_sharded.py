"""Row blocks of a covariance state (probe/sharded.py), in one process: stacked, they are the whole state."""

import numpy as np
import torch

from capscale.probe.sharded import BlockMoments, BlockState, hard_ranks
from capscale.spectrum._torch import Scratch, WindowMoments, accumulate, group_rows

D = 11
CUTS = [0, 4, 8, 11]  # uneven blocks


def _never(reason):
    raise AssertionError(reason)


def _feed(batches, blocks_for, whole_for):
    """The same batches into blocks and a whole accumulator, through the probe's accumulate (3 buckets)."""
    for x, seg in batches:
        grouping = group_rows(x.shape[0], None, seg, 3)
        for k in range(len(CUTS) - 1):
            segs, pooled = blocks_for(k)
            accumulate(x, grouping, torch.float64, Scratch(), segs, pooled, _never)
        segs, pooled = whole_for()
        accumulate(x, grouping, torch.float64, Scratch(), segs, pooled, _never)


def _batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (7, 1, 13, 2):  # a one-row batch: its scatter is zero, only its mean counts
        x = torch.randn(n, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, D, dtype=torch.float64) + 2
        out.append((x, torch.randint(0, 3, (n,), generator=g)))
    return out


def test_row_blocks_stack_to_the_whole_scatter_per_bucket_and_pooled():
    """Both paths of accumulate: one target (the block GEMM) and two (a bucket plus the pooled state,
    where the whole upper-triangle scatter is handed over and its rows are read)."""
    blocks = [[BlockMoments(D, a, b - a, "cpu") for _ in range(4)] for a, b in zip(CUTS, CUTS[1:])]
    whole = [WindowMoments(D, "cpu") for _ in range(4)]
    _feed(_batches(), lambda k: (blocks[k][:3], blocks[k][3]), lambda: (whole[:3], whole[3]))
    only = [BlockMoments(D, a, b - a, "cpu") for a, b in zip(CUTS, CUTS[1:])]  # one target: pooled only
    whole_only = WindowMoments(D, "cpu")
    _feed(_batches(), lambda k: (None, only[k]), lambda: (None, whole_only))
    for j in range(4):
        ref = whole[j].moments()
        got = [b[j].moments() for b in blocks]
        assert all(g.count == ref.count for g in got)
        torch.testing.assert_close(got[0].mean, ref.mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(torch.cat([g.block for g in got]), ref.scatter, rtol=1e-12, atol=1e-12)
    ref = whole_only.moments()
    torch.testing.assert_close(torch.cat([b.moments().block for b in only]), ref.scatter, rtol=1e-12, atol=1e-12)


def test_hard_rank_from_block_scalars_equals_the_eigenvalue_route():
    x = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) @ torch.randn(
        D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    mean = x.mean(0)
    scatter = (x - mean).T @ (x - mean)
    blocks = [BlockState(40, mean, scatter[a:b], a) for a, b in zip(CUTS, CUTS[1:])]
    trace, frob = (sum(v) for v in zip(*(b.scalars() for b in blocks)))
    lam = np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False))
    np.testing.assert_allclose(trace**2 / frob, lam.sum() ** 2 / (lam**2).sum(), rtol=1e-10)
    # one block holding every row: the whole hard rank, and the covariance's trace
    (hard, tr), (nan_rank, _) = hard_ranks([BlockState(40, mean, scatter, 0), BlockState(1, mean, scatter, 0)], None)
    np.testing.assert_allclose(hard, lam.sum() ** 2 / (lam**2).sum(), rtol=1e-10)
    np.testing.assert_allclose(tr, lam.sum(), rtol=1e-12)
    assert np.isnan(nan_rank)  # one row has no covariance


def test_megatron_flags_say_which_linears_are_whole():
    """With a tensor-parallel group, a linear's output (input) is a shard unless Megatron's
    ``gather_output=True`` (``input_is_parallel=False``) says it is whole."""
    from torch import nn

    from capscale.probe.tensor_parallel import _local_layout

    group = object()  # any group: only passed through
    col, row = nn.Linear(8, 5), nn.Linear(5, 8)
    assert _local_layout(col, "output", group) == (group, 5, None)
    assert _local_layout(row, "input", group) == (group, 5, None)
    assert _local_layout(col, "output", None) is None  # no group given: not tensor parallel
    col.gather_output, row.input_is_parallel = True, False
    assert _local_layout(col, "output", group) is None
    assert _local_layout(row, "input", group) is None


def test_memory_accounting_counts_a_row_block_and_its_mean():
    """probe.memory() under tensor parallelism: a rank holds width × D of float64 plus the whole mean."""
    from capscale.probe.hoststates import held_bytes

    held = held_bytes([BlockMoments(D, 4, 4, "cpu")], [], None)
    assert held == {("cpu", "states"): (4 * D + D) * 8}
