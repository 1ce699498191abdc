"""Streaming, exactly mergeable covariance of activation rows.

State is (count, mean, scatter) with scatter = Σ (x - mean)(x - mean)ᵀ. Batches
and whole states combine with Chan et al.'s parallel update, including the
between-means correction, so micro-batch, bucket and data-parallel merges equal
one pass over all rows (up to float round-off). No activations are retained.

NumPy states take each batch through one per-thread scratch buffer and one BLAS
``syrk`` into the lower triangle of the state (the between-means term is an extra
row of that product); the upper triangle is mirrored only when ``scatter`` is read.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from scipy.linalg import blas as _blas

from capscale.spectrum._arrays import dtype_name, is_torch, to_numpy, torch_dtype
from capscale.spectrum.ranks import INDEFINITE_RTOL

# Eigenvalues below this are round-off (or exact zeros) and are clamped to it,
# as in the paper's code, so that log p stays finite.
EIG_FLOOR = 1e-12


class NonFiniteError(ValueError):
    """Activations (or a state) contain NaN or Inf."""


class InsufficientSamplesError(ValueError):
    """Fewer than two samples: no unbiased covariance exists."""


class IndefiniteCovarianceError(ValueError):
    """A materially negative eigenvalue: the matrix is not a covariance."""


_SCRATCH = threading.local()


def scratch_rows(n: int, dim: int, dtype: str) -> np.ndarray:
    """An ``[n, dim]`` view of a per-thread host buffer, grown as needed.

    Batches are consumed inside ``update``, so one buffer serves every NumPy
    accumulator of a thread: no fresh N×D allocation (and its page faults) per batch.
    """
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.size < n * dim:
        buf = bufs[dtype] = np.empty(n * dim, dtype=dtype)
    return buf[: n * dim].reshape(n, dim)


def host_rows(x) -> np.ndarray:
    """Host NumPy view of activations, uncast where possible (the scratch copy casts);
    torch dtypes NumPy lacks (bfloat16) become float32 on their device first."""
    if is_torch(x) and x.dtype.is_floating_point and x.element_size() < 4:
        import torch

        x = x.detach().to(torch.float32)
    return to_numpy(x)


def _syrk_lower_(scatter: np.ndarray, block: np.ndarray) -> None:
    """``scatter += blockᵀ block`` in place, lower triangle only (BLAS syrk: half a GEMM's flops).

    Both operands are handed to BLAS as Fortran-ordered transposes, so nothing is copied.
    """
    syrk = _blas.dsyrk if scatter.dtype == np.float64 else _blas.ssyrk
    # F-order view c = scatterᵀ: c's upper triangle is scatter's lower one.
    syrk(1.0, block.T, beta=1.0, c=scatter.T, trans=0, lower=0, overwrite_c=1)


def _mirror_lower_(a: np.ndarray, block: int = 256) -> None:
    """Copy the lower triangle of a square array onto its upper one, in cache-sized blocks."""
    d = a.shape[0]
    for i in range(0, d, block):
        j = min(i + block, d)
        diag = a[i:j, i:j]
        iu = np.triu_indices(j - i, 1)
        diag[iu] = diag.T[iu]
        a[i:j, j:] = a[j:, i:j].T


def _check_mask(n_mask: int, n_rows: int, x) -> None:
    if n_mask != n_rows:
        raise ValueError(f"mask has {n_mask} entries for {n_rows} rows (shape {tuple(x.shape)})")


def _all_finite(a) -> bool:
    if is_torch(a):
        import torch

        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(a).all())


def clamp_spectrum(raw: np.ndarray) -> np.ndarray:
    """Validate raw ascending/unsorted eigenvalues of a covariance; clamp round-off.

    Returns float64 eigenvalues sorted descending with every value ≥ EIG_FLOOR.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(raw)):
        raise NonFiniteError("covariance eigenvalues contain NaN or Inf")
    max_abs = float(np.abs(raw).max())
    if max_abs <= EIG_FLOOR:
        raise ValueError(
            f"all-zero variance: every eigenvalue is ≤ {EIG_FLOOR:g} (constant features?); ranks are undefined"
        )
    lo = float(raw.min())
    if lo < -INDEFINITE_RTOL * max_abs:
        raise IndefiniteCovarianceError(
            f"covariance is materially indefinite: min eigenvalue {lo:.3e} < "
            f"-{INDEFINITE_RTOL:g} x max|λ| ({max_abs:.3e}); this is not round-off"
        )
    return np.sort(np.clip(raw, EIG_FLOOR, None))[::-1].copy()


# Host tensors up to this width are decomposed by NumPy with one BLAS thread;
# wider ones by torch (see ``eigenvalues_from_covariance``).
SERIAL_EIG_MAX_DIM = 1024


def eigenvalues_from_covariance(cov) -> np.ndarray:
    """Descending, clamped eigenvalues of a covariance matrix (NumPy or torch), float64.

    Uses ``eigvalsh`` (no eigenvectors); an accelerator tensor is decomposed on its
    device. A host tensor comes from a torch process (the probe), where the LAPACK
    call shares two cores with training: measured on 2 cores, NumPy's LAPACK on one
    thread takes 2.3 ms at D = 256 against torch's 4.5 ms (72 vs 87 ms at 1024), and
    NumPy's OpenBLAS on its default threads keeps spinning after the call and
    slowed the training steps that followed. From D = 2048 torch's threaded path
    wins (0.43 s vs 0.74 s). NumPy input is decomposed by NumPy as configured.
    """
    c = cov.detach().double() if is_torch(cov) else np.asarray(cov, dtype=np.float64)
    _check_square(c)
    if not _all_finite(c):
        raise NonFiniteError("covariance contains NaN or Inf")
    if not is_torch(c):
        return clamp_spectrum(np.linalg.eigvalsh(c))
    if c.device.type != "cpu" or c.shape[-1] > SERIAL_EIG_MAX_DIM:
        import torch

        return clamp_spectrum(torch.linalg.eigvalsh(c).cpu().numpy())
    with _serial_blas():
        return clamp_spectrum(np.linalg.eigvalsh(c.numpy()))


_BLAS_CONTROLLER = None


def _serial_blas():
    """A context in which NumPy's BLAS/LAPACK runs on one thread (threadpoolctl; ~10 µs)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()  # scans the loaded libraries once
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def _check_square(c) -> None:
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"covariance must be a square matrix, got shape {tuple(c.shape)}")


class StreamingCovariance:
    """Mean-centred covariance of rows ``[..., D]`` accumulated batch by batch.

    ``device=None`` keeps the state in NumPy on the host (torch tensors are
    accepted and copied over); a torch device (``"cuda"``, ``"cpu"``) keeps it
    in torch on that device, so GPU activations never leave the GPU until the
    D-length spectrum is computed. ``dtype`` defaults to float64; float32 is
    for accelerators where float64 matmul is slow.
    """

    def __init__(self, dim: int, *, dtype: Any = "float64", device: Any = None):
        dim = int(dim)
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}: a spectrum of one eigenvalue has rank 1 by definition")
        self.dim = dim
        self.dtype = dtype_name(dtype)
        self.device = device
        self.reset()

    # -- state -------------------------------------------------------------
    @property
    def uses_torch(self) -> bool:
        return self.device is not None

    def reset(self) -> None:
        self.count = 0
        self.mean = self._zeros(self.dim)
        self.scatter = self._zeros(self.dim, self.dim)

    @property
    def scatter(self):
        """Σ (x - mean)(x - mean)ᵀ, symmetric (NumPy batches fill one triangle; mirrored on read)."""
        if self._half:
            _mirror_lower_(self._scatter)
            self._half = False
        return self._scatter

    @scatter.setter
    def scatter(self, value) -> None:
        self._scatter, self._half = value, False

    def _zeros(self, *shape):
        if self.device is None:
            return np.zeros(shape, dtype=self.dtype)
        import torch

        return torch.zeros(shape, dtype=torch_dtype(self.dtype), device=self.device)

    def _adopt(self, a):
        """A private copy of ``a`` in this accumulator's backend, dtype and device."""
        if self.device is None:
            return np.array(to_numpy(a, self.dtype), copy=True)
        import torch

        t = a if is_torch(a) else torch.from_numpy(np.asarray(a))
        return t.detach().to(device=self.device, dtype=torch_dtype(self.dtype), copy=True)

    # -- accumulation ------------------------------------------------------
    def _n_rows(self, x) -> int:
        """Rows in a batch ``[..., D]``; a clear error for a wrong shape, D or an empty batch."""
        shape = tuple(x.shape)
        if len(shape) < 2:
            raise ValueError(f"expected activations of shape [..., {self.dim}], got {shape}")
        if shape[-1] != self.dim:
            raise ValueError(f"wrong dimension: rows have D={shape[-1]}, accumulator has D={self.dim}")
        n_rows = int(np.prod(shape[:-1]))
        if n_rows == 0:
            raise ValueError(f"empty batch: activations of shape {shape} hold no rows")
        return n_rows

    def _rows(self, x, mask):
        """Torch backend: rows ``[n, D]`` on the state's device and dtype, and whether they are
        a private copy (then centred in place) rather than a view of the caller's tensor."""
        import torch

        n_rows = self._n_rows(x)
        t = x if is_torch(x) else torch.from_numpy(np.asarray(x))
        rows = t.detach().reshape(n_rows, self.dim).to(self.device, torch_dtype(self.dtype))
        owned = rows.data_ptr() != t.data_ptr()
        if mask is not None:
            m = mask.reshape(-1) if is_torch(mask) else torch.from_numpy(np.asarray(mask).reshape(-1))
            _check_mask(m.shape[0], n_rows, x)
            m = m.to(self.device).bool()
            rows, owned = rows[m], True  # boolean indexing copies
        return rows, owned

    def update(self, x, mask=None) -> StreamingCovariance:
        """Add rows ``x`` of shape ``[..., D]`` (NumPy or torch); ``mask`` keeps rows where true.

        Raises on NaN/Inf before touching the state, so what was accumulated stays valid.
        A mask that keeps no row is a no-op; a batch with no rows at all is an error.
        """
        if self.device is not None:
            return self._accumulate(*self._rows(x, mask))
        rows = self._host_rows(x, mask)
        n = int(rows.shape[0])
        if n:
            block = scratch_rows(n + 1, self.dim, self.dtype)
            np.copyto(block[:n], rows, casting="unsafe")  # the one conversion copy
            self._accumulate_block(block, n, self._block_mean(block, n))
        return self

    def _host_rows(self, x, mask):
        """``[n, D]`` host view of the kept rows (not yet converted or copied where avoidable)."""
        n_rows = self._n_rows(x)
        rows = host_rows(x).reshape(n_rows, self.dim)
        if mask is not None:
            m = to_numpy(mask).reshape(-1)
            _check_mask(m.shape[0], n_rows, x)
            rows = rows[m.astype(bool)]
        return rows

    def _block_mean(self, block: np.ndarray, n: int) -> np.ndarray:
        """Mean of ``block[:n]``; a NaN/Inf anywhere in a column makes it non-finite (a D-length check)."""
        mean = block[:n].mean(0)
        if not np.isfinite(mean).all():
            raise NonFiniteError(f"activations contain NaN or Inf ({n} rows, D={self.dim})")
        return mean

    def _accumulate_block(self, block: np.ndarray, n: int, batch_mean: np.ndarray) -> None:
        """Add rows ``block[:n]`` (scratch; ``block[n]`` is a free row) with their mean.

        Centred rows plus one row √(n_a n_b / n)·(mean_b − mean_a) give, in a single
        syrk, the batch scatter and Chan's between-means term, added into the state in place.
        """
        block[:n] -= batch_mean
        if self.count == 0:
            self.count, self.mean = n, batch_mean
            self._scatter[...] = 0
            k = n
        else:
            total = self.count + n
            delta = batch_mean - self.mean
            block[n] = delta * np.sqrt(self.count * n / total)
            self.mean = self.mean + delta * (n / total)
            self.count, k = total, n + 1
        _syrk_lower_(self._scatter, block[:k])
        self._half = True

    def _accumulate(self, rows, owned: bool) -> StreamingCovariance:
        """Torch backend: add converted rows; ``owned`` rows are scratch and get centred in place."""
        n = int(rows.shape[0])
        if n == 0:
            return self
        batch_mean = rows.mean(0)
        # A NaN/Inf anywhere in a column makes its mean non-finite: a D-length check.
        if not _all_finite(batch_mean):
            raise NonFiniteError(f"activations contain NaN or Inf ({n} rows, D={self.dim})")
        if owned:
            rows -= batch_mean  # center in place: no second N×D buffer
            centered = rows
        else:
            centered = rows - batch_mean
        self._combine(n, batch_mean, centered.T @ centered)
        return self

    def _combine(self, n_b: int, mean_b, scatter_b) -> None:
        """Chan et al.: merge moments (n_b, mean_b, scatter_b), which this object now owns.

        A NumPy ``scatter_b`` needs only its lower triangle valid (see ``_syrk_lower_``).
        """
        n_a = self.count
        if n_a == 0:
            self.count, self.mean, self.scatter = n_b, mean_b, scatter_b
            self._half = self.device is None
            return
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        if self.device is None:  # in place, lower triangle: no D×D temporaries
            self._scatter += scatter_b
            syr = _blas.dsyr if self._scatter.dtype == np.float64 else _blas.ssyr
            syr(n_a * n_b / n, delta, lower=0, a=self._scatter.T, overwrite_a=1)
            self._half = True
        else:
            self._scatter += scatter_b
            self._scatter += delta[:, None] * (delta * (n_a * n_b / n))[None, :]  # between-means term
        self.count = n

    def merge(self, other: StreamingCovariance) -> StreamingCovariance:
        """Fold ``other`` into this state exactly (``other`` is left unchanged)."""
        if not isinstance(other, StreamingCovariance):
            raise TypeError(f"can only merge a StreamingCovariance, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge D={other.dim} into D={self.dim}")
        if other.count:
            if self.count and self._native(other):  # read-only use: no copy of other's D×D state
                self._combine(other.count, other.mean, other._scatter)
            else:
                self._combine(other.count, self._adopt(other.mean), self._adopt(other.scatter))
        return self

    def _native(self, other: StreamingCovariance) -> bool:
        return other.dtype == self.dtype and str(other.device) == str(self.device)

    def copy(self) -> StreamingCovariance:
        out = object.__new__(StreamingCovariance)
        out.dim, out.dtype, out.device, out.count = self.dim, self.dtype, self.device, self.count
        clone = (lambda a: a.clone()) if self.uses_torch else (lambda a: a.copy())
        out.mean, out._scatter, out._half = clone(self.mean), clone(self._scatter), self._half
        return out

    # -- results -----------------------------------------------------------
    def covariance(self):
        """Unbiased covariance ``scatter / (N - 1)`` in float64 (NumPy, or torch on the state's device)."""
        if self.count < 2:
            raise InsufficientSamplesError(f"need at least 2 samples for a covariance, have {self.count}")
        if self.device is None:
            return self.scatter.astype(np.float64) / (self.count - 1)
        return self.scatter.double() / (self.count - 1)

    def eigenvalues(self) -> np.ndarray:
        """Covariance eigenvalues, descending, float64 NumPy, round-off clamped at 1e-12."""
        return eigenvalues_from_covariance(self.covariance())

    def summary(self, **kwargs) -> dict:
        """``spectrum_summary`` of this state; fewer than 2 samples → an 'insufficient' record."""
        from capscale.spectrum.summary import spectrum_summary

        eigs = self.eigenvalues() if self.count >= 2 else None
        return spectrum_summary(eigs, self.count, dim=self.dim, **kwargs)

    # -- serialisation -----------------------------------------------------
    def state_dict(self) -> dict:
        """Copies of the state; arrays are NumPy or torch, as the backend."""
        copy = (lambda a: a.clone()) if self.uses_torch else (lambda a: a.copy())
        return {
            "dim": self.dim,
            "dtype": self.dtype,
            "count": int(self.count),
            "mean": copy(self.mean),
            "scatter": copy(self.scatter),
        }

    @classmethod
    def from_state_dict(cls, state: dict, *, device: Any = None) -> StreamingCovariance:
        """Rebuild from ``state_dict()`` output, onto ``device`` (None = NumPy on the host)."""
        missing = {"dim", "count", "mean", "scatter"} - set(state)
        if missing:
            raise ValueError(f"covariance state is missing {sorted(missing)}")
        obj = cls(int(state["dim"]), dtype=state.get("dtype", "float64"), device=device)
        count = int(state["count"])
        mean, scatter = obj._adopt(state["mean"]), obj._adopt(state["scatter"])
        if count < 0 or tuple(mean.shape) != (obj.dim,) or tuple(scatter.shape) != (obj.dim, obj.dim):
            raise ValueError(
                f"inconsistent covariance state: count={count}, mean {tuple(mean.shape)}, "
                f"scatter {tuple(scatter.shape)} for D={obj.dim}"
            )
        if not (_all_finite(mean) and _all_finite(scatter)):
            raise NonFiniteError("covariance state contains NaN or Inf")
        obj.count, obj.mean, obj.scatter = count, mean, scatter
        return obj

    def __repr__(self) -> str:
        where = "numpy" if self.device is None else f"torch:{self.device}"
        return f"StreamingCovariance(dim={self.dim}, count={self.count}, dtype={self.dtype}, {where})"
