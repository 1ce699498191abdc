"""Covariance states split by rows across a tensor-parallel group: each rank owns a block.

Under tensor parallelism a site's activations are column shards: rank ``r`` holds
columns ``[offset, offset + width)`` of the hidden state. On a measured step the
shards are all-gathered (``tensor_parallel.ColumnShard.gather``) and every rank
accumulates only its rows of the scatter, ``Xᵣᵀ X`` (width × D), so the float64
state per rank is 1/tp of the whole. The mean (D floats) is kept whole on every rank.

Merges are Chan's, row block by row block: the between-means term of rows
``[a, b)`` is ``n_a n_b / n · δ[a:b] δᵀ``, which needs only the block's rows.
At a window's end the blocks of data-parallel replicas are reduced (the same
two all-reduces as ``distributed.reduce_moments``, on width × D buffers); the hard
rank ``tr(S)² / ‖S‖²_F`` comes from two scalars per block summed over the group
(no decomposition); an exact spectrum from one site's blocks at a time gathered on
one rank (``assemble``), a Lanczos one from products with the blocks all-gathered over
the group (``block_row``, ``distributed_matmat``): nothing D × D anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from capscale.probe.distributed import _comm_device
from capscale.spectrum._torch import Moments


@dataclass(frozen=True)
class BlockState:
    """``count`` rows: their whole float64 mean and rows ``[offset, offset + width)`` of their scatter."""

    count: int
    mean: torch.Tensor  # [D]
    block: torch.Tensor  # [width, D]
    offset: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def width(self) -> int:
        return int(self.block.shape[0])

    def scalars(self) -> tuple[float, float]:
        """This block's share of ``(tr S, ‖S‖²_F)``: summed over the group's blocks they are the whole one's."""
        own = self.block[:, self.offset : self.offset + self.width]
        return float(own.diagonal().sum()), float(self.block.square().sum())


def _rows_of_upper(square: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows ``[a, b)`` of the symmetric matrix whose upper triangle ``square`` holds (below it: stale)."""
    return square[a:b].triu(a) + square[:, a:b].T.tril(a - 1)


class BlockMoments:
    """A window's accumulator for one block of rows: the :class:`WindowMoments` interface that
    ``spectrum._torch.accumulate`` feeds (``add_rows``, ``add``), on a width × D float64 block."""

    def __init__(self, dim: int, offset: int, width: int, device, dtype: torch.dtype = torch.float64):
        self.dim, self.offset, self.width = dim, offset, width
        self.scatter = torch.zeros(width, dim, dtype=dtype, device=device)
        self._mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.scatter.dtype

    @property
    def device(self) -> torch.device:
        return self.scatter.device

    def reset(self) -> None:
        self.scatter.zero_()
        self._mean.zero_()
        self.count = 0

    def takes_rows(self, dtype: torch.dtype) -> bool:
        return True

    def add_rows(self, centred: torch.Tensor, mean: torch.Tensor) -> None:
        """A batch given by its rows about their own ``mean`` (N × D, the whole width)."""
        a, b = self.offset, self.offset + self.width
        block = centred[:, a:b].T @ centred  # in the compute dtype, as the unsharded GEMM
        self._merge(int(centred.shape[0]), mean, block)

    def add(self, count: int, mean: torch.Tensor, scatter: torch.Tensor | None) -> None:
        """A batch of ``count`` rows: its mean and its whole D × D scatter (upper triangle read), or None."""
        block = None if scatter is None else _rows_of_upper(scatter, self.offset, self.offset + self.width)
        self._merge(int(count), mean, block)

    def _merge(self, n: int, mean: torch.Tensor, block: torch.Tensor | None) -> None:
        if n == 0:
            return
        mean = mean.to(self.device, torch.float64)
        if block is not None:
            self.scatter.add_(block.to(self.device))
        if self.count == 0:
            self._mean.copy_(mean)
            self.count = n
            return
        total = self.count + n
        delta = mean - self._mean
        a, b = self.offset, self.offset + self.width
        # Chan's between-means term, rows [a, b) only: n_a n_b / n · δ[a:b] δᵀ.
        self.scatter.addr_(delta[a:b].to(self.dtype), delta.to(self.dtype), alpha=self.count * n / total)
        self._mean.add_(delta, alpha=n / total)
        self.count = total

    def moments(self, full: bool = True) -> BlockState:
        """The block so far (shares this accumulator's buffer: use it before ``reset``)."""
        return BlockState(self.count, self._mean.clone(), self.scatter, self.offset)


def reduce_blocks(states: list[BlockState], group) -> list[BlockState]:
    """Merge each block across ``group`` (replicas holding the same rows of the same stream), exactly.

    The parallel-axis theorem, as ``distributed.reduce_moments``: global means first, then each
    rank's block about them, summed. Every rank of the group ends with the merged blocks.
    """
    dist = torch.distributed
    if group is None or not states:
        return states
    dev = _comm_device(group)  # a rank with no rows yet holds host zeros: all meet on one device
    states = [BlockState(s.count, s.mean.to(dev), s.block.to(dev), s.offset) for s in states]
    buf = torch.cat(
        [torch.cat([torch.tensor([float(s.count)], device=dev, dtype=torch.float64), s.mean * s.count]) for s in states]
    )
    dist.all_reduce(buf, group=group)
    out, off, means = [], 0, []
    for s in states:
        n = round(float(buf[off]))
        means.append((n, buf[off + 1 : off + 1 + s.dim] / max(n, 1)))
        off += 1 + s.dim
    about = []
    for s, (_, mu) in zip(states, means):
        delta = (s.mean - mu).to(s.block.dtype)
        a, b = s.offset, s.offset + s.width
        about.append((s.block + s.count * torch.outer(delta[a:b], delta)).reshape(-1))
    buf = torch.cat(about)
    dist.all_reduce(buf, group=group)
    off = 0
    for s, (n, mu) in zip(states, means):
        size = s.block.numel()
        out.append(BlockState(n, mu, buf[off : off + size].reshape(s.block.shape), s.offset))
        off += size
    return out


def hard_ranks(states: list[BlockState], group) -> list[tuple[float, float]]:
    """``(hard rank, trace of the covariance)`` of each whole state from its blocks over ``group``:
    ``tr(S)² / ‖S‖²_F`` from two scalars per block, no decomposition (NaN where undefined)."""
    terms = torch.tensor([s.scalars() for s in states], dtype=torch.float64).reshape(-1)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        terms = terms.to(_comm_device(group))
        torch.distributed.all_reduce(terms, group=group)
    out = []
    for s, (tr, fro) in zip(states, terms.reshape(-1, 2).tolist()):
        if s.count < 2 or not tr > 0:
            out.append((float("nan"), float("nan") if s.count < 2 else tr / (s.count - 1)))
        else:
            out.append((tr * tr / fro, tr / (s.count - 1)))
    return out


def assemble(states: list[BlockState], widths: list[int], group, dst: int) -> list[Moments] | None:
    """The whole states from their blocks, on global rank ``dst`` of ``group`` (host memory); None elsewhere.

    ``widths``: every group rank's block width, in group-rank order. Each rank sends its block
    to ``dst``, which receives it straight into its rows of the host matrix (through one
    block-sized buffer on the communication device where that is an accelerator). The
    result is read by its upper triangle (``upper=True``).
    """
    dist = torch.distributed
    dev = _comm_device(group)
    here = dist.get_rank() == dst
    ranks = dist.get_process_group_ranks(group)
    me = dist.get_rank(group)
    out = []
    for s in states:
        if not here:
            if widths[me]:
                dist.send(s.block.to(dev, torch.float64).contiguous(), dst=dst, group=group)
            continue
        whole = torch.empty(s.dim, s.dim, dtype=torch.float64)
        off = 0
        for r, w in zip(ranks, widths):
            rows = whole[off : off + w]
            if r == dst:
                rows.copy_(s.block)
            elif w and dev.type == "cpu":
                dist.recv(rows, src=r, group=group)
            elif w:
                buf = torch.empty(w, s.dim, dtype=torch.float64, device=dev)
                dist.recv(buf, src=r, group=group)
                rows.copy_(buf)
            off += w
        out.append(Moments(s.count, s.mean.to("cpu"), whole, upper=True))
    return out if here else None


def merge_blocks(parts: list[BlockState]) -> BlockState:
    """The exact merge of disjoint streams' blocks (e.g. HEAD/MID/TAIL into ALL): Chan's, by rows."""
    p0 = parts[0]
    acc = BlockMoments(p0.dim, p0.offset, p0.width, p0.block.device, p0.block.dtype)
    for p in parts:
        acc._merge(p.count, p.mean, p.block)
    return acc.moments()


def resolve_on(spectrum: str, shard, writer: int) -> str:
    """``estimated.resolve`` for a sharded site, the same on every rank of its group: "auto"
    is decided by the free host memory of ``writer`` (the rank that would assemble it)."""
    from capscale.probe.estimated import SPECTRUM_METHODS, resolve

    method = resolve(spectrum, shard.full_dim)
    if spectrum != "auto":
        return method
    code = torch.tensor([SPECTRUM_METHODS.index(method)], dtype=torch.int64, device=_comm_device(shard.group))
    torch.distributed.broadcast(code, src=writer, group=shard.group)
    return SPECTRUM_METHODS[int(code.item())]


def named_blocks(parts: list[BlockState], bucketed: bool) -> dict[str, BlockState]:
    """A site's blocks by bucket name: "all" (with the buckets: their merge, block by block) first."""
    from capscale.spectrum import BUCKETS

    return {"all": merge_blocks(parts), **dict(zip(BUCKETS, parts))} if bucketed else {"all": parts[0]}


def row_labels(site, start: int, bucket: str) -> dict:
    return {
        "step": start,
        "layer": site.layer,
        "site": site.site,
        "bucket": bucket,
        "stack": site.stack,
        "module": site.name,
    }


def estimated_rows(site, start: int, parts: list[BlockState], shard, method: str, bucketed: bool) -> list[dict]:
    """A sharded site's spectra rows by ``method`` ("lanczos" or "hard-only") from its blocks:
    nothing assembled. Every rank of ``shard.group`` calls it (collectives) and gets the same
    rows. See :func:`block_row`.
    """
    named = named_blocks(parts, bucketed)
    return [block_row(s, row_labels(site, start, b), method, shard) for b, s in named.items()]


def block_row(s: BlockState, labels: dict, method: str, shard) -> dict:
    """The row ``estimated.estimated_row`` gives the whole state, from this rank's block of it.

    Trace, ‖S‖²_F and the diagonal's largest entry are per-block scalars reduced over the
    group; Lanczos sees the covariance only through ``C·V``: each rank multiplies its rows
    (width × D) by the probe block V (D × k) and the products are all-gathered, so every
    rank runs the same seeded recurrence on the same numbers (``distributed_matmat``).
    """
    from capscale.probe.estimated import blank_row, finish_row

    dist = torch.distributed
    group = shard.group
    dev = _comm_device(group)
    row = blank_row(s.count, s.dim, labels, method)
    if s.count < 2:
        row["spectrum_status"] = "insufficient"
        return row
    tr, fro = s.scalars()
    own = s.block[:, s.offset : s.offset + s.width].diagonal()
    bad = float((~torch.isfinite(s.block)).sum())
    sums = torch.tensor([tr, fro, bad], dtype=torch.float64, device=dev)
    top = torch.tensor([float(own.abs().max()) if s.width else 0.0], dtype=torch.float64, device=dev)
    dist.all_reduce(sums, group=group)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    tr, fro, bad = sums.tolist()
    if bad or not math.isfinite(top.item()):
        raise ValueError(f"{labels.get('module', '')} {labels.get('bucket', '')}: covariance contains NaN or Inf")
    if top.item() == 0:
        row.update(trace=0.0, lambda_max=0.0, spectrum_status="zero_variance")
        return row
    div = s.count - 1
    matmat = distributed_matmat(s.block, shard.widths, group, divide=div)
    return finish_row(row, method, s.dim, tr / div, tr * tr / fro, fro / div**2, matmat)


def distributed_matmat(block: torch.Tensor, widths, group, divide: float = 1.0):
    """``V ↦ S V / divide`` (NumPy, D × k) for the symmetric ``S`` whose rows ``block`` holds on this rank:
    this rank's rows' product, all-gathered over ``group`` (``widths`` in group-rank order)."""
    dev = _comm_device(group)
    wide = max(widths)

    def matmat(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v)).to(block.device, block.dtype)
        part = (block @ x).to(dev, torch.float64)
        if part.shape[0] < wide:  # all_gather needs equal sizes: pad the narrower blocks
            part = torch.nn.functional.pad(part, (0, 0, 0, wide - part.shape[0]))
        got = [torch.empty_like(part) for _ in widths]
        torch.distributed.all_gather(got, part.contiguous(), group=group)
        whole = torch.cat([g[:w] for g, w in zip(got, widths)])
        return whole.cpu().numpy() / divide

    return matmat
