"""Token-frequency regimes (HEAD / MID / TAIL) and the one-pass bucketed accumulator."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from capscale.atomic import atomic_write_text
from capscale.spectrum._arrays import is_torch, to_numpy
from capscale.spectrum.covariance import NonFiniteError, StreamingCovariance, host_rows, scratch_rows

BUCKETS = ("head", "mid", "tail")
HEAD, MID, TAIL = 0, 1, 2
_FORMAT = "capscale.frequency_table"


class FrequencyTable:
    """Unigram counts → HEAD/MID/TAIL by cumulative occurrence mass (the paper's rule).

    Types sorted by count (descending), ``k`` = how many leading types keep the
    cumulative mass ≤ a cut. HEAD holds every type counted at least as often as
    type number ``k_head`` (at least one type); MID every other type counted at
    least as often as type number ``k_mid`` (``k_mid`` ≥ ``k_head`` + 1); TAIL the
    rest, including types never seen. Boundaries are count thresholds
    (``head_min_count``, ``mid_min_count``), so equal counts always share a
    bucket: a tie group that straddles a cut leaves the later bucket empty
    rather than being split. An empty bucket makes the table degenerate
    (``empty_buckets``, ``is_degenerate``, and a warning); none is invented.
    """

    def __init__(self, counts, cuts: tuple[float, float] = (0.33, 0.67)):
        c = np.asarray(to_numpy(counts))
        if c.ndim != 1 or c.size < 3:
            raise ValueError(f"counts must be a 1-D array over >= 3 token types, got shape {c.shape}")
        if not np.issubdtype(c.dtype, np.integer):
            if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
                raise ValueError("counts must be non-negative integers")
        c = c.astype(np.int64)
        if c.min() < 0:
            raise ValueError("counts must be non-negative integers")
        if c.sum() == 0:
            raise ValueError("counts are all zero: no occurrences to split into buckets")
        lo, hi = (float(x) for x in cuts)
        if not 0 < lo < hi < 1:
            raise ValueError(f"cuts must satisfy 0 < head < mid < 1, got {cuts}")
        self.counts = c
        self.cuts = (lo, hi)
        self.head_min_count, self.mid_min_count = self._thresholds()
        self._table = np.full(c.size, TAIL, dtype=np.int8)
        self._table[c >= self.mid_min_count] = MID
        self._table[c >= self.head_min_count] = HEAD
        present = np.bincount(self._table, minlength=len(BUCKETS)) > 0
        self.empty_buckets = tuple(name for name, p in zip(BUCKETS, present) if not p)
        if self.empty_buckets:
            warnings.warn(
                f"degenerate frequency table: bucket(s) {', '.join(self.empty_buckets)} hold no token type "
                f"(ties or too few distinct counts); their rows will be absent",
                UserWarning,
                stacklevel=2,
            )
        self._torch_tables: dict[Any, Any] = {}

    @property
    def is_degenerate(self) -> bool:
        """True when HEAD, MID or TAIL holds no token type."""
        return bool(self.empty_buckets)

    def _thresholds(self) -> tuple[int, int]:
        """The paper's cut indices, as count thresholds (``k`` types within a cut: ``cum <= total·cut``)."""
        order = np.sort(self.counts)[::-1]
        cum = np.cumsum(order).astype(np.float64)
        total, n = float(cum[-1]), order.size
        head_k = max(1, min(int(np.sum(cum <= total * self.cuts[0])), n - 1))
        mid_k = max(head_k + 1, min(int(np.sum(cum <= total * self.cuts[1])), n - 1))
        # Never-seen types are TAIL whatever the cuts say: MID needs a count of at least 1.
        return int(order[head_k - 1]), max(int(order[mid_k - 1]), 1)

    # -- construction ------------------------------------------------------
    @classmethod
    def from_token_ids(cls, batches: Iterable, vocab_size: int | None = None, cuts=(0.33, 0.67)) -> FrequencyTable:
        """Count token ids from any iterable of id arrays (NumPy, torch, lists)."""
        counts = np.zeros(0 if vocab_size is None else int(vocab_size), dtype=np.int64)
        for ids in batches:
            a = np.asarray(to_numpy(ids)).reshape(-1)
            if a.size == 0:
                continue
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"token ids must be integers, got dtype {a.dtype}")
            if a.min() < 0 or (vocab_size is not None and a.max() >= vocab_size):
                raise ValueError(f"token id out of range [0, {vocab_size}): min {a.min()}, max {a.max()}")
            b = np.bincount(a, minlength=counts.size)
            if b.size > counts.size:
                counts = np.pad(counts, (0, b.size - counts.size))
            counts += b
        return cls(counts, cuts)

    # -- lookup ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.counts.size)

    def bucket(self, ids):
        """Bucket index (0 HEAD, 1 MID, 2 TAIL) per token id, same shape; torch in → torch out (same device)."""
        if is_torch(ids):
            import torch

            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
            if ids.device.type == "cpu":  # NumPy: µs where each torch call costs tens inside a training step
                return torch.from_numpy(np.asarray(self.bucket(ids.numpy())))  # a 0-d id gives a 0-d tensor
            if ids.numel():
                self._check_range(*torch.stack(torch.aminmax(ids.reshape(-1))).tolist())  # one pass, one sync
            table = self._torch_tables.get(ids.device)
            if table is None:
                table = torch.from_numpy(self._table).to(ids.device)
                self._torch_tables[ids.device] = table
            return table[ids.long()]
        a = np.asarray(ids)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {a.dtype}")
        if a.size:
            self._check_range(int(a.min()), int(a.max()))
        return self._table[a]

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"token id out of range: ids span [{lo}, {hi}] but the frequency table "
                f"covers [0, {self.vocab_size - 1}] (vocab_size {self.vocab_size})"
            )

    # -- reporting / io ----------------------------------------------------
    def stats(self) -> dict:
        """Per bucket: number of types and share of occurrences; plus the thresholds."""
        total = int(self.counts.sum())
        out: dict[str, Any] = {
            "vocab_size": self.vocab_size,
            "total_tokens": total,
            "nonzero_types": int((self.counts > 0).sum()),
            "cuts": list(self.cuts),
            "head_min_count": self.head_min_count,
            "mid_min_count": self.mid_min_count,
            "empty_buckets": list(self.empty_buckets),
            "buckets": {},
        }
        for i, name in enumerate(BUCKETS):
            sel = self._table == i
            occ = int(self.counts[sel].sum())
            out["buckets"][name] = {
                "num_types": int(sel.sum()),
                "num_occurrences": occ,
                "share": occ / total,
            }
        return out

    def save(self, path) -> Path:
        """Write JSON (counts + human-readable stats), atomically."""
        path = Path(path)
        doc = {"format": _FORMAT, "version": 1, "stats": self.stats(), "counts": self.counts.tolist()}
        return atomic_write_text(path, json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, path) -> FrequencyTable:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a capscale frequency table")
        return cls(np.asarray(doc["counts"], dtype=np.int64), tuple(doc["stats"]["cuts"]))

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, FrequencyTable) and self.cuts == other.cuts and np.array_equal(self.counts, other.counts)
        )

    def __repr__(self) -> str:
        s = self.stats()["buckets"]
        parts = ", ".join(f"{k}={v['num_types']} types/{v['share']:.1%}" for k, v in s.items())
        return f"FrequencyTable(vocab_size={self.vocab_size}, {parts})"


def _refuse(reason: str) -> NonFiniteError:
    return NonFiniteError(f"activations refused: {reason}")


def _check_bucket_range(lo: int, hi: int, k: int) -> None:
    if lo < 0 or hi >= k:
        raise ValueError(f"bucket ids must lie in [0, {k}), got values in [{lo}, {hi}]")


class BucketedCovariance:
    """One accumulator per bucket, fed in one pass; the pooled state is their exact merge.

    Each batch's rows are grouped by bucket (one stable sort) and every bucket
    state is updated once, so the product work equals the pooled case; ``pooled()``
    merges the bucket states (no fourth accumulator). A batch with NaN/Inf in any
    bucket is rejected before any bucket state changes.
    """

    def __init__(self, dim: int, n_buckets: int = 3, *, dtype="float64", device=None):
        if n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
        self.dim = int(dim)
        self.buckets = [StreamingCovariance(dim, dtype=dtype, device=device) for _ in range(n_buckets)]

    def update(self, x, bucket_ids, mask=None) -> BucketedCovariance:
        """Rows ``x [..., D]`` with one bucket index per row (``bucket_ids`` shaped ``x.shape[:-1]``)."""
        lead = tuple(x.shape[:-1])
        if tuple(bucket_ids.shape) != lead:
            raise ValueError(f"bucket ids of shape {tuple(bucket_ids.shape)} for rows of shape {lead}")
        if mask is not None and tuple(mask.shape) != lead:
            raise ValueError(f"mask of shape {tuple(mask.shape)} for rows of shape {lead}")
        self.buckets[0].batch_rows(x)  # shape, D, dtype and empty-batch errors, as a pooled update gives
        if self.buckets[0].device is None:
            self._update_host(x, bucket_ids, mask)
        else:
            self._update_torch(x, bucket_ids, mask)
        return self

    def _update_host(self, x, bucket_ids, mask) -> None:
        """NumPy states: one stable sort, then each bucket's rows are gathered (and cast) straight
        into its slice of a shared scratch block, with a free row after each slice for the
        between-means term; all means are checked before any state changes."""
        k = len(self.buckets)
        b = np.asarray(to_numpy(bucket_ids)).reshape(-1).astype(np.int64, copy=False)
        _check_bucket_range(int(b.min()), int(b.max()), k)
        if mask is not None:  # masked rows get bucket k and sort past the kept ones
            b = np.where(np.asarray(to_numpy(mask)).reshape(-1).astype(bool), b, k)
        order = np.argsort(b, kind="stable")
        bounds = np.searchsorted(b[order], np.arange(k + 1)).tolist()
        rows = host_rows(x).reshape(b.size, self.dim)  # a view: no conversion yet
        block = scratch_rows(bounds[k] + k, self.dim, self.buckets[0].dtype)
        parts = []
        for i in range(k):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                sub = block[lo + i : hi + i + 1]
                np.copyto(sub[: hi - lo], rows[order[lo:hi]], casting="unsafe")
                parts.append((self.buckets[i], sub, hi - lo, self.buckets[i].block_mean(sub, hi - lo)))
        for acc, sub, n, mean in parts:
            acc.add_block(sub, n, mean)

    def _update_torch(self, x, bucket_ids, mask) -> None:
        """Torch states (e.g. on the GPU): the probe's own path (``capscale.spectrum._torch``):
        one gather into a reused buffer, every bucket checked before any state changes."""
        import torch

        from capscale.spectrum import _torch

        k, first = len(self.buckets), self.buckets[0]
        dev = first.torch_moments.device
        xt = (x if is_torch(x) else torch.from_numpy(np.asarray(x))).detach().to(dev)
        b = torch.as_tensor(bucket_ids if is_torch(bucket_ids) else to_numpy(bucket_ids), device=dev).reshape(-1)
        lo, hi = torch.aminmax(b)
        _check_bucket_range(int(lo), int(hi), k)
        keep = None
        if mask is not None:
            keep = torch.as_tensor(mask if is_torch(mask) else np.asarray(mask), device=dev).reshape(-1).bool()
        if not hasattr(self, "_scratch"):
            self._scratch = _torch.Scratch()
        grouping = _torch.group_rows(b.numel(), keep, b, k)
        accs = [acc.torch_moments for acc in self.buckets]
        _torch.accumulate(xt, grouping, accs[0].dtype, self._scratch, accs, None, _refuse)

    def pooled(self) -> StreamingCovariance:
        """The all-rows state: exact Chan merge of the bucket states."""
        out = self.buckets[0].copy()
        for acc in self.buckets[1:]:
            out.merge(acc)
        return out

    def states(self) -> dict[str, StreamingCovariance]:
        """``{"all": pooled, "head": ..., "mid": ..., "tail": ...}`` for the 3-bucket case."""
        names = BUCKETS if len(self.buckets) == 3 else tuple(str(i) for i in range(len(self.buckets)))
        return {"all": self.pooled(), **dict(zip(names, self.buckets))}

    def reset(self) -> None:
        for acc in self.buckets:
            acc.reset()
