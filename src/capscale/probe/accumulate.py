"""The per-forward work of a measured step: which rows each forward contributes, and the hand-off
to the spectral core's torch backend (``capscale.spectrum._torch``), which groups them, forms
the batch moments and folds them into the window's accumulators. Nothing here runs outside
measured steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from capscale.probe.sites import Site
from capscale.spectrum import BUCKETS, NonFiniteError
from capscale.spectrum._torch import (
    FOLD,
    PARTIAL_FOLD,
    Grouping,
    Moments,
    Scratch,
    WindowMoments,
    group_rows,
    panel_bounds,
    scatter_upper_,
    symmetrize_,
)
from capscale.spectrum._torch import accumulate as _accumulate

__all__ = [
    "FOLD",
    "PARTIAL_FOLD",
    "Forward",
    "Grouping",
    "Moments",
    "NonFiniteActivationError",
    "Scratch",
    "WindowMoments",
    "accumulate",
    "compute_dtype",
    "panel_bounds",
    "pooled",
    "scatter_upper_",
    "symmetrize_",
]


class NonFiniteActivationError(NonFiniteError):
    """NaN/Inf (or overflowing values) in the activations of one site; nothing of that forward
    was accumulated for it."""

    def __init__(self, message: str, *, layer: int, site: str, step: int):
        super().__init__(message)
        self.layer, self.site, self.step = layer, site, step


def compute_dtype(activation_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """GEMM dtype: the request, else the activations' own (half precisions are widened to float32)."""
    if requested is not None:
        return requested
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


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
            return group_rows(n_rows, keep, None, 1)
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
        return group_rows(n_rows, keep, self.bucket_ids.to(device), len(BUCKETS))


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
    """Fold the rows of ``x [..., D]`` into per-segment and/or pooled accumulators (see
    ``capscale.spectrum._torch.accumulate``); a refused forward names its site and step."""

    def refuse(reason: str) -> NonFiniteActivationError:
        return NonFiniteActivationError(
            f"non-finite activations at {site.label}, step {step}: {reason}; "
            "nothing of this forward was accumulated for this site",
            layer=site.layer,
            site=site.site,
            step=step,
        )

    _accumulate(x, grouping, dtype, scratch, segment_accs, pooled_acc, refuse)


def pooled(parts: list[Moments]) -> Moments:
    """The exact merge of disjoint parts (e.g. HEAD/MID/TAIL into ALL), as a new Moments."""
    return Moments.merge_all(parts)
