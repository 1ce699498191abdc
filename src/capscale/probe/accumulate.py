"""The per-forward work of a measured step: group rows, form batch moments, fold them in.

For each site and forward the rows ``[N, D]`` are (optionally) gathered into
HEAD/MID/TAIL order once, centred per segment by the segment's own mean, and
the segment's scatter is one GEMM in the *compute* dtype (the activations'
own float32 by default; float64 on request). Centring per batch keeps the
GEMM's rounding relative to the variance, not to the mean².

Within a window the batch scatters are summed in float64 (one D×D pass per
batch) and the batch means are kept; their between-means term
``Σ n_b (μ_b − μ)(μ_b − μ)ᵀ`` is folded in every ``FOLD`` batches as one
rank-k update. This is Chan's exact merge, applied to a block of batches at
once instead of one rank-one update (and three D×D temporaries) per batch.
At the end of a window the accumulators yield ``Moments`` (count, mean,
scatter) for the spectrum functions. Nothing here runs outside measured steps.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from capscale.probe.sites import Site
from capscale.spectrum import BUCKETS, NonFiniteError

# Batch means kept before their between-means term is folded into the scatter:
# bounds memory (FOLD × D per accumulator) while amortising the rank-k GEMM.
FOLD = 32


class NonFiniteActivationError(NonFiniteError):
    """NaN/Inf in the activations of one site; nothing of that forward was accumulated for it."""

    def __init__(self, message: str, *, layer: int, site: str, step: int):
        super().__init__(message)
        self.layer, self.site, self.step = layer, site, step


def compute_dtype(activation_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """GEMM dtype: the request, else the activations' own (half precisions are widened to float32)."""
    if requested is not None:
        return requested
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


@dataclass
class Grouping:
    """Rows to keep, in segment order: ``index`` (None = all rows as they are) and segment bounds."""

    index: torch.Tensor | None
    bounds: list[int]


@dataclass
class Forward:
    """What one root forward knows: its token ids, padding mask and derived row groupings."""

    ids: torch.Tensor | None
    mask: torch.Tensor | None
    bucket_ids: torch.Tensor | None
    capture: bool
    _groupings: dict = field(default_factory=dict)

    def grouping(self, site: Site, n_rows: int, device: torch.device, bucketed: bool) -> Grouping:
        key = (n_rows, device, bucketed)
        g = self._groupings.get(key)
        if g is None:
            g = self._groupings[key] = self._group(site, n_rows, device, bucketed)
        return g

    def _group(self, site: Site, n_rows: int, device, bucketed: bool) -> Grouping:
        keep = None
        if self.mask is not None:
            if self.mask.numel() != n_rows:
                raise ValueError(
                    f"{site.label}: the padding mask has {self.mask.numel()} entries for {n_rows} activation rows"
                )
            keep = self.mask.to(device).reshape(-1)
        if not bucketed:
            if keep is None:
                return Grouping(None, [0, n_rows])
            index = keep.nonzero().squeeze(1)
            return Grouping(index, [0, int(index.numel())])
        if self.bucket_ids is None:
            raise ValueError(
                f"{site.label}: a frequency table is set but this forward has no token ids; "
                "call the model with input_ids (or ids as its first argument), or give them "
                "with probe.batch(token_ids=...)"
            )
        if self.bucket_ids.numel() != n_rows:
            raise ValueError(
                f"{site.label}: the activations have {n_rows} rows but the token ids have "
                f"{self.bucket_ids.numel()} entries (shape {tuple(self.ids.shape)})"
            )
        b = self.bucket_ids.to(device).reshape(-1).long()
        k = len(BUCKETS)
        if keep is not None:
            b = torch.where(keep, b, k)  # masked rows sort past every bucket and are dropped
        counts = torch.bincount(b, minlength=k + 1)[:k]
        bounds = [0] + torch.cumsum(counts, 0).tolist()
        order = torch.argsort(b, stable=True)[: bounds[-1]]
        return Grouping(order, bounds)


def panel_bounds(rows: int, dim: int) -> list[int]:
    """Column panels for one scatter GEMM of ``rows × dim``: 1, 2 or 4.

    A scatter is symmetric, so only its block upper triangle is formed (as
    BLAS ``syrk`` would; torch has no syrk): 3/4 of the GEMM flops with 2
    panels, 10/16 with 4. Measured on a CPU at D = 256: 2 panels are ~10%
    faster than one GEMM from ~170 rows, 4 panels ~25% from ~1000 rows
    (~25% at D = 1024); below ~128 rows or columns the extra calls cost more
    than they save.
    """
    p = 1 if rows < 128 or dim < 128 else 4 if rows >= 1024 and dim >= 256 else 2
    return [round(k * dim / p) for k in range(p + 1)]


def symmetrize_(square: torch.Tensor) -> torch.Tensor:
    """Set the strict lower triangle from the upper one (in place); the lower one is never read."""
    square.copy_(square.triu() + square.triu(1).mT)
    return square


def scatter_upper_(square: torch.Tensor, centred: torch.Tensor) -> None:
    """``square``'s upper triangle ← that of ``centredᵀ centred``; what is below it is left undefined."""
    for a, b in itertools.pairwise(panel_bounds(*centred.shape)):
        block = square[a:b, a:]
        torch.addmm(block, centred[:, a:b].T, centred[:, a:], beta=0, out=block)


class Scratch:
    """Reusable per-site buffers, so a measured forward allocates no N×D or D×D temporaries.

    Fresh large tensors come straight from the C allocator, and their page
    faults cost as much as the arithmetic at these sizes; reuse avoids both.
    """

    def __init__(self):
        self._bufs: dict = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised ``shape`` view of the buffer ``name`` (grown when too small)."""
        numel = math.prod(shape)
        key = (name, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def accumulate(
    x: torch.Tensor,
    grouping: Grouping,
    dtype: torch.dtype,
    scratch: Scratch,
    site: Site,
    step: int,
    segment_accs: list | None,
    pooled_acc: WindowMoments | None,
) -> None:
    """Fold the rows of ``x [..., D]`` into per-segment and/or pooled accumulators.

    Every segment is centred by its own mean and its scatter is one GEMM in
    ``dtype``. All segment means are checked for NaN/Inf before anything is
    added, so a bad forward leaves the accumulators as they were.
    """
    d = x.shape[-1]
    rows = x.detach().reshape(-1, d)
    n_kept = grouping.bounds[-1]
    buf = scratch.get("rows", (n_kept, d), dtype, rows.device)
    if grouping.index is not None:
        if rows.dtype == dtype:
            torch.index_select(rows, 0, grouping.index, out=buf)
        else:
            buf.copy_(rows.index_select(0, grouping.index))  # gather, then widen
        src, owned = buf, True
    elif rows.dtype != dtype:
        src, owned = buf.copy_(rows), True
    else:
        src, owned = rows, False  # the model's own tensor: read, never written
    segs = list(itertools.pairwise(grouping.bounds))
    means = [src[a:b].mean(0) if b > a else None for a, b in segs]
    live = [m for m in means if m is not None]
    if not live:
        return
    # A NaN/Inf anywhere in a column makes that column's mean, and so this
    # float64 sum, non-finite: one scalar read instead of an elementwise check.
    total = live[0].sum(dtype=torch.float64) if len(live) == 1 else torch.cat(live).sum(dtype=torch.float64)
    if not math.isfinite(float(total)):
        raise NonFiniteActivationError(
            f"non-finite activations (NaN or Inf) at {site.label}, step {step}; "
            "nothing of this forward was accumulated for this site",
            layer=site.layer,
            site=site.site,
            step=step,
        )
    square = scratch.get("square", (d, d), dtype, rows.device)
    wide = square if dtype == torch.float64 else scratch.get("square64", (d, d), torch.float64, rows.device)
    for j, (a, b) in enumerate(segs):
        if means[j] is None:
            continue
        # Centred per batch: the GEMM sees deviations, so its rounding is
        # relative to the variance rather than to the mean².
        if owned:
            centred = src[a:b].sub_(means[j])
        else:
            centred = torch.sub(src[a:b], means[j], out=buf[: b - a])
        scatter_upper_(square, centred)
        if wide is not square:
            wide.copy_(square)  # widen once into a reused buffer, not per target
        for acc in (segment_accs[j] if segment_accs is not None else None, pooled_acc):
            if acc is not None:
                acc.add(b - a, means[j], wide)


@dataclass(frozen=True)
class Moments:
    """``count`` rows summarised by their float64 mean and scatter ``Σ (x − mean)(x − mean)ᵀ``."""

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self) -> torch.Tensor:
        """Unbiased ``scatter / (count − 1)``; needs count ≥ 2."""
        return self.scatter / (self.count - 1)


class WindowMoments:
    """Exact float64 moments of one (site, bucket) over a window, fed by batch moments."""

    def __init__(self, dim: int, device):
        self.dim = dim
        # Σ over batches of each batch's scatter about its own mean (plus folded
        # between-terms). Only the upper triangle is meaningful (see
        # ``scatter_upper_``); ``moments()`` mirrors it before anyone reads it.
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0
        self._counts: list[int] = []
        self._means: list[torch.Tensor] = []

    def reset(self) -> None:
        """Empty again, keeping the D×D buffer (reused window after window)."""
        if self.count:
            self.scatter.zero_()
        self.count = 0
        self._counts, self._means = [], []

    def add(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """A batch of ``count`` rows: its mean and its scatter about that mean (any float dtype).

        Only the upper triangle of ``scatter`` matters (see ``scatter_upper_``).
        """
        if count == 0:
            return
        dev = self.scatter.device
        self.scatter.add_(scatter.to(dev))
        self._counts.append(int(count))
        self._means.append(mean.to(dev))  # widened to float64 when folded
        self.count += int(count)
        if len(self._means) >= FOLD:
            self._fold()

    def _fold(self) -> None:
        if len(self._means) <= 1:
            return
        n = torch.tensor(self._counts, dtype=torch.float64, device=self.scatter.device)
        means = torch.stack([m.to(torch.float64) for m in self._means])
        total = sum(self._counts)
        mu = (n @ means) / total
        dev = means - mu
        # Σ n_b (μ_b − μ)(μ_b − μ)ᵀ: the folded batches now act as one batch (total, μ).
        self.scatter.addmm_(dev.T * n, dev)
        self._counts, self._means = [total], [mu]

    def moments(self) -> Moments:
        """The window so far. Shares this accumulator's buffer: use it before ``reset``/``add``."""
        self._fold()
        symmetrize_(self.scatter)
        mean = self._means[0].to(torch.float64) if self._means else self.scatter.new_zeros(self.dim)
        return Moments(self.count, mean, self.scatter)


def pooled(parts: list[Moments]) -> Moments:
    """The exact merge of disjoint parts (e.g. HEAD/MID/TAIL into ALL), as a new Moments."""
    acc = WindowMoments(parts[0].dim, parts[0].scatter.device)
    for p in parts:
        acc.add(p.count, p.mean, p.scatter)
    return acc.moments()
