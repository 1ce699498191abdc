"""The torch backend of the spectral core: one implementation of the covariance math on tensors.

``StreamingCovariance(device=…)``, ``BucketedCovariance`` on a torch device and the
probe all accumulate through this module (imported only when torch is in use, as
``_arrays`` is NumPy's plumbing).

For each batch the rows ``[N, D]`` are (optionally) gathered into segment order
once (HEAD/MID/TAIL, masked rows dropped), centred per segment by the segment's
own mean, and the segment's scatter is one GEMM in the *compute* dtype. Centring
per batch keeps the GEMM's rounding relative to the variance, not to the mean².

An accumulator sums the batch scatters (one D×D pass per batch) and keeps the
batch means; their between-means term ``Σ n_b (μ_b − μ)(μ_b − μ)ᵀ`` is folded in
every ``FOLD`` batches as one rank-k update. This is Chan's exact merge applied
to a block of batches at once; :meth:`Moments.merge_all` is the same block merge
for finished states (buckets into "all"), and :meth:`Moments.scatter_about` the
per-rank term of the data-parallel reduction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from capscale.spectrum._arrays import OVERFLOW_HEADROOM

# Batch means kept before their between-means term is folded into the scatter:
# bounds memory (FOLD × D per accumulator) while amortising the rank-k GEMM.
FOLD = 32
# Batch scatters summed in a narrower GEMM dtype on the host before they are added
# to the float64 state: the partial sum's rounding is then that of one GEMM over
# this many batches' rows (see ``WindowMoments.add_rows``).
PARTIAL_FOLD = 8


def overflow_limit(dtype) -> float:
    """Largest per-column sum of squared deviations a batch may have in ``dtype``."""
    return float(torch.finfo(dtype).max) * OVERFLOW_HEADROOM


@dataclass(frozen=True)
class Moments:
    """``count`` rows summarised by their mean and scatter ``Σ (x − mean)(x − mean)ᵀ`` (float64).

    ``upper``: only the scatter's upper triangle holds the state (what is below it is
    finite but stale), as the probe hands a window's states to ``eigvalsh(UPLO="U")``
    without mirroring them; ``covariance()`` is always the full matrix.
    """

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor
    upper: bool = False

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self) -> torch.Tensor:
        """Unbiased ``scatter / (count − 1)``, a new symmetric tensor; needs count ≥ 2."""
        cov = self.scatter / (self.count - 1)
        return symmetrize_(cov) if self.upper else cov

    def scatter_about(self, center: torch.Tensor) -> torch.Tensor:
        """``Σ (x − center)(x − center)ᵀ`` over this state's rows (parallel-axis theorem), a new tensor
        (its upper triangle only, if ``upper``)."""
        delta = (self.mean - center).to(self.scatter.dtype)
        return self.scatter + self.count * torch.outer(delta, delta)

    def merge(self, other: Moments) -> Moments:
        """The exact merge of two disjoint states (Chan et al.), as a new Moments."""
        return Moments.merge_all([self, other])

    @staticmethod
    def merge_all(parts: Sequence[Moments]) -> Moments:
        """The exact merge of disjoint states (e.g. HEAD/MID/TAIL into ALL), as a new Moments."""
        acc = WindowMoments(parts[0].dim, parts[0].scatter.device, parts[0].scatter.dtype, _blank=True)
        for p in parts:
            acc.add(p.count, p.mean, p.scatter)
        return acc.moments(full=not any(p.upper for p in parts))


class WindowMoments:
    """Exact moments of one stream (a site and bucket over a window), fed by batch moments.

    The state is float64 unless ``dtype`` says otherwise (float32 on request, for
    accelerators where float64 is slow); batch means are always kept in float64.
    """

    # True for a state that takes each batch's scatter in its GEMM dtype and widens it itself
    # (a host-held state fed from a device buffer, ``capscale.probe.hoststates``).
    staged = False

    def __init__(self, dim: int, device, dtype: torch.dtype = torch.float64, *, _blank: bool = False):
        self.dim = dim
        # Σ over batches of each batch's scatter about its own mean (plus folded
        # between-terms). Only the upper triangle is meaningful (see
        # ``scatter_upper_``); ``moments()`` mirrors it before anyone reads it.
        # ``_blank`` (an internal merge, whose first write is a whole-matrix add): not cleared.
        make = torch.empty if _blank else torch.zeros
        self.scatter = make(dim, dim, dtype=dtype, device=device)
        # True while ``scatter`` counts as zero but still holds old values: after ``reset``
        # the next write overwrites it instead of adding, which saves a D×D clearing pass.
        self._stale = _blank
        self.count = 0
        self._counts: list[int] = []
        self._means: list[torch.Tensor] = []
        self._partial: torch.Tensor | None = None  # see add_rows
        self._partial_batches = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.scatter.dtype

    @property
    def device(self) -> torch.device:
        return self.scatter.device

    def reset(self) -> None:
        """Empty again, keeping the D×D buffers (reused window after window)."""
        self._stale = True
        self.count = 0
        self._counts, self._means = [], []
        self._partial_batches = 0

    def add_rows(self, centred: torch.Tensor, mean: torch.Tensor) -> None:
        """A batch given by its rows about their own ``mean`` (``centred``, N×D, N ≥ 1): the
        scatter GEMM (in ``centred``'s dtype) accumulates straight into this state.

        In the state's own dtype the GEMM adds into the state itself. A narrower
        GEMM on the host adds into a partial sum in its own dtype, added to the
        state every ``PARTIAL_FOLD`` batches: per batch this saves a D×D
        conversion and a D×D float64 add, which at D = 256 cost as much as a
        small batch's GEMM. On an accelerator those are cheap and the partial
        (half a state again) is not worth its memory: the batch's scatter is
        formed in a scratch buffer and handed to :meth:`add` (``takes_rows`` is False).
        """
        if centred.dtype == self.scatter.dtype:
            scatter_upper_(self.scatter, centred, accumulate=not self._stale)
            self._stale = False
        else:
            if not self.takes_rows(centred.dtype):
                raise ValueError(f"a {centred.dtype} GEMM on {self.device} goes through add(), not add_rows()")
            if self._partial is None or self._partial.dtype != centred.dtype:
                self._partial = torch.zeros_like(self.scatter, dtype=centred.dtype)  # below the diagonal: finite
                self._partial_batches = 0
            scatter_upper_(self._partial, centred, accumulate=self._partial_batches > 0)
            self._partial_batches += 1
            if self._partial_batches >= PARTIAL_FOLD:
                self._flush_partial()
        self.add(int(centred.shape[0]), mean, None)

    def takes_rows(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`add_rows` takes a batch whose GEMM runs in ``dtype``."""
        return dtype == self.scatter.dtype or self.scatter.device.type == "cpu"

    def _flush_partial(self) -> None:
        if self._partial_batches:
            self._write(self._partial)
            self._partial_batches = 0

    def _write(self, scatter: torch.Tensor) -> None:
        """Add a whole D×D term into the state (a copy when the state is stale)."""
        if self._stale:
            self.scatter.copy_(scatter)
            self._stale = False
        else:
            self.scatter.add_(scatter)

    def _zero_if_stale(self) -> None:
        """Clear the state's old values before a term is added in place to it."""
        if self._stale:
            self.scatter.zero_()
            self._stale = False

    def add(self, count: int, mean: torch.Tensor, scatter: torch.Tensor | None) -> None:
        """A batch of ``count`` rows: its mean and its scatter about that mean (any float dtype;
        None when it is zero, as for one row).

        Only the upper triangle of ``scatter`` matters (see ``scatter_upper_``).
        """
        if count == 0:
            return
        dev = self.scatter.device
        if scatter is not None:
            self._write(scatter.to(dev))
        self._counts.append(int(count))
        self._means.append(mean.to(dev))  # widened to float64 when folded
        self.count += int(count)
        if len(self._means) >= FOLD:
            self._fold()

    def _fold(self) -> None:
        if len(self._means) <= 1:
            return
        n = torch.tensor(self._counts, dtype=torch.float64, device=self.scatter.device)
        means = torch.stack(self._means).to(torch.float64)  # one widening, not one per mean
        total = sum(self._counts)
        mu = (n @ means) / total
        dev = means - mu
        self._zero_if_stale()  # every batch so far was one row: nothing was written yet
        # Σ n_b (μ_b − μ)(μ_b − μ)ᵀ: the folded batches now act as one batch (total, μ).
        if self.scatter.dtype == torch.float64:
            self.scatter.addmm_(dev.T * n, dev)
        else:
            self.scatter.add_((dev.T * n) @ dev)
        self._counts, self._means = [total], [mu]

    def mean(self) -> torch.Tensor:
        """The float64 mean of everything added so far (zeros when empty)."""
        self._flush_partial()
        self._fold()
        return (
            self._means[0].to(torch.float64) if self._means else self.scatter.new_zeros(self.dim, dtype=torch.float64)
        )

    def moments(self, full: bool = True) -> Moments:
        """The stream so far. Shares this accumulator's buffer: use it before ``reset``/``add``.

        ``full=False`` skips mirroring the upper triangle into the lower one (a Moments
        with ``upper=True``), for a consumer that reads only the upper triangle.
        """
        mean = self.mean()
        self._zero_if_stale()  # nothing but one-row batches (or nothing at all): a zero scatter
        if full:
            symmetrize_(self.scatter)
        return Moments(self.count, mean, self.scatter, upper=not full)

    def load(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Replace the state by ``(count, mean, scatter)`` (copied onto this device and dtype)."""
        self.scatter.copy_(scatter)
        self._stale = False
        self._partial_batches = 0
        self.count = int(count)
        self._counts, self._means = ([self.count], [mean.to(self.device, torch.float64).clone()]) if count else ([], [])

    def copy(self) -> WindowMoments:
        self._flush_partial()
        out = object.__new__(WindowMoments)
        out.dim, out.count = self.dim, self.count
        out.scatter = self.scatter.new_zeros(self.scatter.shape) if self._stale else self.scatter.clone()
        out._stale, out._partial, out._partial_batches = False, None, 0
        out._counts, out._means = list(self._counts), list(self._means)  # means are never written in place
        return out


def panel_bounds(rows: int, dim: int) -> list[int]:
    """Column panels for one scatter GEMM of ``rows × dim``: 1, 2 or 4.

    A scatter is symmetric, so only its block upper triangle is formed (as
    BLAS ``syrk`` would; torch has no syrk): 3/4 of the GEMM flops with 2
    panels, 10/16 with 4. Below ~128 rows or columns the extra calls cost more
    than they save (see docs/benchmarks.md).
    """
    p = 1 if rows < 128 or dim < 128 else 4 if rows >= 1024 and dim >= 256 else 2
    return [round(k * dim / p) for k in range(p + 1)]


def symmetrize_(square: torch.Tensor) -> torch.Tensor:
    """Set the strict lower triangle from the upper one (in place); the lower one is never read."""
    lower = square.mT.tril(-1)  # one temporary: 2.5x faster than triu() + triu(1).mT at D = 256
    return square.triu_().add_(lower)


def scatter_upper_(square: torch.Tensor, centred: torch.Tensor, accumulate: bool = False) -> None:
    """``square``'s upper triangle ← (or += with ``accumulate``) that of ``centredᵀ centred``;
    what is below it is left undefined."""
    for a, b in itertools.pairwise(panel_bounds(*centred.shape)):
        block = square[a:b, a:]
        if accumulate:
            block.addmm_(centred[:, a:b].T, centred[:, a:])
        else:
            torch.addmm(block, centred[:, a:b].T, centred[:, a:], beta=0, out=block)


class Scratch:
    """Reusable buffers, so an accumulated batch allocates no N×D or D×D temporaries.

    Fresh large tensors come straight from the C allocator, and their page
    faults cost as much as the arithmetic at these sizes; reuse avoids both.
    """

    def __init__(self):
        self._bufs: dict = {}
        self._last: dict = {}  # name -> (request, view): shapes repeat batch after batch

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A ``shape`` view of the buffer ``name`` (grown when too small), holding whatever was last
        written there; zeros when new, so a triangle no GEMM writes stays finite."""
        request = (shape, dtype, device)
        last = self._last.get(name)
        if last is not None and last[0] == request:
            return last[1]
        numel = math.prod(shape)
        key = (name, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.zeros(numel, dtype=dtype, device=device)
        view = buf[:numel].view(shape)
        self._last[name] = (request, view)
        return view


@dataclass
class Grouping:
    """Rows to keep, in segment order: ``index`` (None = all rows as they are) and segment bounds."""

    index: torch.Tensor | None
    bounds: list[int]


def group_rows(n_rows: int, keep: torch.Tensor | None, segment_ids: torch.Tensor | None, k: int) -> Grouping:
    """Rows kept by the boolean ``keep`` (None = all), ordered by ``segment_ids`` in ``[0, k)`` (None = one segment).

    One stable sort: rows keep their order within a segment; masked rows sort past every segment.
    """
    if segment_ids is None:
        if keep is None:
            return Grouping(None, [0, n_rows])
        index = keep.reshape(-1).nonzero().squeeze(1)
        return Grouping(index, [0, int(index.numel())])
    if segment_ids.device.type == "cpu":  # NumPy: µs where each torch call costs tens inside a training step
        return _group_host(keep, segment_ids, k)
    b = segment_ids.reshape(-1).long()
    if keep is not None:
        b = torch.where(keep.reshape(-1).to(b.device), b, k)
    counts = torch.bincount(b, minlength=k + 1)[:k]
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    order = torch.argsort(b, stable=True)[: bounds[-1]]
    return Grouping(order, bounds)


def _group_host(keep: torch.Tensor | None, segment_ids: torch.Tensor, k: int) -> Grouping:
    """``group_rows`` for host tensors, in NumPy (the same stable order)."""
    b = segment_ids.reshape(-1).numpy().astype(np.int64)
    if keep is not None:
        b = np.where(keep.reshape(-1).cpu().numpy(), b, k)
    bounds = [0, *np.cumsum(np.bincount(b, minlength=k + 1)[:k]).tolist()]
    return Grouping(torch.from_numpy(np.argsort(b, kind="stable")[: bounds[-1]]), bounds)


def accumulate(
    x: torch.Tensor,
    grouping: Grouping,
    dtype: torch.dtype,
    scratch: Scratch,
    segment_accs: Sequence[WindowMoments | None] | None,
    pooled_acc: WindowMoments | None,
    refuse: Callable[[str], Exception],
) -> None:
    """Fold the rows of ``x [..., D]`` into per-segment and/or pooled accumulators.

    Every segment is centred by its own mean and its scatter is one GEMM in
    ``dtype``. Before anything is added, the batch is refused (``refuse(reason)``
    is raised) when a mean is NaN/Inf or the scatter could overflow ``dtype``, so
    a bad batch leaves every accumulator as it was.
    """
    if x.is_complex():
        raise ValueError(f"complex activations ({x.dtype}) have no real covariance; pass a real tensor")
    d = x.shape[-1]
    rows = x.detach().reshape(-1, d)
    n_kept = grouping.bounds[-1]
    buf = scratch.get("rows", (n_kept, d), dtype, rows.device)
    if grouping.index is not None:
        index = grouping.index.to(rows.device)
        if rows.dtype == dtype:
            torch.index_select(rows, 0, index, out=buf)
        else:
            buf.copy_(rows.index_select(0, index))  # gather, then widen
        src, owned = buf, True
    elif rows.dtype != dtype:
        src, owned = buf.copy_(rows), True
    else:
        src, owned = rows, False  # the caller's own tensor: read, never written
    segs = list(itertools.pairwise(grouping.bounds))
    means = [src[a:b].mean(0) if b > a else None for a, b in segs]
    if all(m is None for m in means):
        return
    # One pass over the kept rows: NaN/Inf propagate into the extremes; max − min bounds
    # every |x − μ|, so n · (max − min)² bounds each scatter diagonal entry, and
    # bounding max |x| alike keeps the means' sums finite.
    lo, hi = torch.stack(torch.aminmax(src)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise refuse(f"NaN or Inf ({n_kept} rows, D={d})")
    if max(hi - lo, -lo, hi) > math.sqrt(overflow_limit(dtype) / n_kept):
        raise refuse(
            f"values too large: |x| up to {max(-lo, hi):.3g} over {n_kept} rows would overflow the {dtype} "
            f"scatter (D={d})"
        )
    # Centred per batch: the GEMM sees deviations, so its rounding is
    # relative to the variance rather than to the mean².
    centred = [
        None if m is None or b - a < 2 else src[a:b].sub_(m) if owned else torch.sub(src[a:b], m, out=buf[a:b])
        for m, (a, b) in zip(means, segs)
    ]
    square = wide = None
    for j, (a, b) in enumerate(segs):
        if means[j] is None:
            continue
        targets = [acc for acc in (segment_accs[j] if segment_accs else None, pooled_acc) if acc is not None]
        if centred[j] is None:  # one row is its own mean: its scatter is exactly zero
            for acc in targets:
                acc.add(1, means[j], None)
            continue
        if len(targets) == 1 and targets[0].takes_rows(dtype):
            targets[0].add_rows(centred[j], means[j])  # the GEMM accumulates in place
            continue
        if square is None:
            state_dtype = targets[0].dtype
            square = scratch.get("square", (d, d), dtype, rows.device)
            narrow_ok = dtype == state_dtype or all(acc.staged for acc in targets)
            wide = square if narrow_ok else scratch.get("square_state", (d, d), state_dtype, rows.device)
        scatter_upper_(square, centred[j])
        if wide is not square:
            wide.copy_(square)  # convert once into a reused buffer, not per target
        for acc in targets:
            acc.add(b - a, means[j], wide)
