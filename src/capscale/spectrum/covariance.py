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

import contextlib
import math
import threading
from typing import Any

import numpy as np
from scipy.linalg import blas as _blas

from capscale.spectrum._arrays import OVERFLOW_HEADROOM, dtype_name, is_torch, to_numpy, torch_dtype
from capscale.spectrum.ranks import INDEFINITE_RTOL

# Eigenvalues below this are round-off (or exact zeros) and are clamped to it,
# as in the paper's code, so that log p stays finite ...
EIG_FLOOR = 1e-12
# ... unless the whole spectrum is tiny: then the floor is this fraction of the
# largest eigenvalue (the round-off tolerance of INDEFINITE_RTOL), so the clamp
# is the paper's for every spectrum with λ_max ≥ 1e-6 and scales with the rest.
EIG_FLOOR_RTOL = 1e-6


def eig_floor(lambda_max: float) -> float:
    """The clamp for a spectrum whose largest |eigenvalue| is ``lambda_max``: min(1e-12, 1e-6 · λ_max)."""
    return min(EIG_FLOOR, EIG_FLOOR_RTOL * lambda_max)


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


def _overflow_limit(dtype: str) -> float:
    """Largest per-column sum of squared deviations a host batch may have (as the torch backend's)."""
    return float(np.finfo(dtype).max) * OVERFLOW_HEADROOM


def _check_mask(n_mask: int, n_rows: int, x) -> None:
    if n_mask != n_rows:
        raise ValueError(f"mask has {n_mask} entries for {n_rows} rows (shape {tuple(x.shape)})")


def _all_finite(a) -> bool:
    # A finite sum has no NaN/Inf among its terms, and the sum is one pass without a mask
    # (15x cheaper at D = 256); only a non-finite sum (or an overflowing one) needs the full check.
    if math.isfinite(float(a.sum())):
        return True
    if is_torch(a):
        import torch

        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(a).all())


def clamp_spectrum(raw: np.ndarray, ascending: bool = False) -> np.ndarray:
    """Validate raw ascending/unsorted eigenvalues of a covariance; clamp round-off.

    Returns float64 eigenvalues sorted descending with every value ≥ ``eig_floor(max|λ|)``
    (1e-12 for any spectrum with max|λ| ≥ 1e-6). Only an exactly zero spectrum is an error.
    ``ascending``: ``raw`` is in ascending order already (as ``eigvalsh`` returns it), so
    it is reversed rather than sorted.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(raw)):
        raise NonFiniteError("covariance eigenvalues contain NaN or Inf")
    if not ascending:
        raw = np.sort(raw)
    lo, max_abs = float(raw[0]), max(-float(raw[0]), float(raw[-1]))
    if max_abs == 0:
        raise ValueError("all-zero variance: every eigenvalue is 0 (constant features?); ranks are undefined")
    if lo < -INDEFINITE_RTOL * max_abs:
        raise IndefiniteCovarianceError(
            f"covariance is materially indefinite: min eigenvalue {lo:.3e} < "
            f"-{INDEFINITE_RTOL:g} x max|λ| ({max_abs:.3e}); this is not round-off"
        )
    return np.maximum(raw[::-1], eig_floor(max_abs))  # a new, contiguous array


# Host tensors up to this width are decomposed by NumPy with one BLAS thread;
# wider ones by torch (see ``eigenvalues_from_covariance`` and docs/benchmarks.md).
SERIAL_EIG_MAX_DIM = 1024


def eigenvalues_from_covariance(
    cov, *, divisor: float = 1, upper: bool = False, check_finite: bool = True
) -> np.ndarray:
    """Descending, clamped eigenvalues of a covariance matrix (NumPy or torch), float64.

    ``divisor``: the eigenvalues of ``cov / divisor`` (a scatter and ``n − 1``: the
    division is done on the D eigenvalues, not the D² entries). ``upper``: only the
    upper triangle of ``cov`` is read (``eigvalsh(UPLO="U")``); the lower one may hold
    anything finite. ``check_finite=False`` (as in SciPy) skips the NaN/Inf pass over the
    matrix, for a caller that knows it (a scatter whose diagonal is finite: every entry
    is bounded by ``√(S_ii S_jj)``); non-finite eigenvalues are still an error.

    Uses ``eigvalsh`` (no eigenvectors). NumPy input is decomposed by NumPy as
    configured; an accelerator tensor by torch on its device. A host tensor comes
    from a torch process (the probe), where the LAPACK call shares the cores with
    training: up to ``SERIAL_EIG_MAX_DIM`` it goes to NumPy's LAPACK on one thread
    (faster there than torch's, and without OpenBLAS threads left spinning after
    the call to slow the training steps that follow), wider ones to torch's
    threaded ``eigvalsh``. Timings behind this choice: docs/benchmarks.md.
    """
    c = cov.detach().double() if is_torch(cov) else np.asarray(cov, dtype=np.float64)
    _check_square(c)
    if check_finite and not _all_finite(c):
        raise NonFiniteError("covariance contains NaN or Inf")
    try:
        raw = _eigvalsh(c, "U" if upper else "L")
    except Exception as exc:  # LAPACK's "did not converge" on an unchecked NaN: say what it was
        if not check_finite and not _all_finite(c):
            raise NonFiniteError("covariance contains NaN or Inf") from exc
        raise
    return clamp_spectrum(raw / divisor if divisor != 1 else raw, ascending=True)


def _eigvalsh(c, uplo: str) -> np.ndarray:
    """Ascending eigenvalues of a float64 NumPy array or torch tensor (see ``eigenvalues_from_covariance``)."""
    if not is_torch(c):
        return np.linalg.eigvalsh(c, UPLO=uplo)
    if c.device.type != "cpu" or c.shape[-1] > SERIAL_EIG_MAX_DIM:
        import torch

        return torch.linalg.eigvalsh(c, UPLO=uplo).cpu().numpy()
    with _serial_blas():
        return np.linalg.eigvalsh(c.numpy(), UPLO=uplo)


_BLAS_CONTROLLER = None
_SERIAL = threading.local()


@contextlib.contextmanager
def _serial_blas():
    """A context in which NumPy's BLAS/LAPACK runs on one thread (threadpoolctl).

    Nested uses in a thread are free: only the outermost sets and restores the limit,
    which costs tens of µs inside a training step (the probe holds it for a window's
    decompositions, see ``capscale.probe.records.spectrum_rows``).
    """
    global _BLAS_CONTROLLER
    depth = getattr(_SERIAL, "depth", 0)
    _SERIAL.depth = depth + 1
    try:
        if depth:
            yield
            return
        if _BLAS_CONTROLLER is None:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER = ThreadpoolController()  # scans the loaded libraries once
        with _BLAS_CONTROLLER.limit(limits=1, user_api="blas"):
            yield
    finally:
        _SERIAL.depth = depth


def _check_square(c) -> None:
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"covariance must be a square matrix, got shape {tuple(c.shape)}")


class StreamingCovariance:
    """Mean-centred covariance of rows ``[..., D]`` accumulated batch by batch.

    ``device=None`` keeps the state in NumPy on the host (torch tensors are
    accepted and copied over); a torch device (``"cuda"``, ``"cpu"``) keeps it
    in torch on that device, so GPU activations never leave the GPU until the
    D-length spectrum is computed: that backend is the probe's own
    (``capscale.spectrum._torch``). ``dtype`` defaults to float64; float32 is
    for accelerators where float64 matmul is slow.
    """

    def __init__(self, dim: int, *, dtype: Any = "float64", device: Any = None):
        dim = int(dim)
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}: a spectrum of one eigenvalue has rank 1 by definition")
        self.dim = dim
        self.dtype = dtype_name(dtype)
        self.device = device
        self._moments = None
        if device is not None:
            from capscale.spectrum import _torch

            self._moments = _torch.WindowMoments(dim, device, torch_dtype(self.dtype))
            self._scratch = _torch.Scratch()
        self.reset()

    # -- state -------------------------------------------------------------
    @property
    def uses_torch(self) -> bool:
        return self.device is not None

    @property
    def torch_moments(self):
        """The torch backend's accumulator (``capscale.spectrum._torch.WindowMoments``); None on NumPy."""
        return self._moments

    def reset(self) -> None:
        if self._moments is not None:
            self._moments.reset()
            return
        self._count = 0
        self._mean = np.zeros(self.dim, dtype=self.dtype)
        self._scatter, self._half = np.zeros((self.dim, self.dim), dtype=self.dtype), False

    @property
    def count(self) -> int:
        return self._count if self._moments is None else self._moments.count

    @property
    def mean(self):
        """The mean row (NumPy, or a torch float64 tensor on the state's device)."""
        return self._mean if self._moments is None else self._moments.mean()

    @property
    def scatter(self):
        """Σ (x - mean)(x - mean)ᵀ, symmetric (batches fill one triangle; mirrored on read)."""
        if self._moments is not None:
            return self._moments.moments().scatter
        if self._half:
            _mirror_lower_(self._scatter)
            self._half = False
        return self._scatter

    def _adopt(self, a):
        """A private copy of ``a`` in this accumulator's backend, dtype and device."""
        if self.device is None:
            return np.array(to_numpy(a, self.dtype), copy=True)
        import torch

        t = a if is_torch(a) else torch.from_numpy(np.asarray(a))
        return t.detach().to(device=self._moments.device, dtype=torch_dtype(self.dtype), copy=True)

    # -- accumulation ------------------------------------------------------
    def batch_rows(self, x) -> int:
        """Rows in a batch ``[..., D]``; a clear error for a wrong shape, D, dtype or an empty batch."""
        shape = tuple(x.shape)
        if len(shape) < 2:
            raise ValueError(f"expected activations of shape [..., {self.dim}], got {shape}")
        if shape[-1] != self.dim:
            raise ValueError(f"wrong dimension: rows have D={shape[-1]}, accumulator has D={self.dim}")
        if x.is_complex() if is_torch(x) else np.iscomplexobj(x):
            raise ValueError(f"complex activations ({x.dtype}) have no real covariance; pass real values")
        n_rows = int(np.prod(shape[:-1]))
        if n_rows == 0:
            raise ValueError(f"empty batch: activations of shape {shape} hold no rows")
        return n_rows

    def update(self, x, mask=None) -> StreamingCovariance:
        """Add rows ``x`` of shape ``[..., D]`` (NumPy or torch); ``mask`` keeps rows where true.

        Raises on NaN/Inf, or values whose scatter would overflow, before touching the
        state, so what was accumulated stays valid. A mask that keeps no row is a no-op;
        a batch with no rows at all is an error.
        """
        if self._moments is not None:
            return self._update_torch(x, mask)
        rows = self._host_rows(x, mask)
        n = int(rows.shape[0])
        if n:
            block = scratch_rows(n + 1, self.dim, self.dtype)
            np.copyto(block[:n], rows, casting="unsafe")  # the one conversion copy
            self.add_block(block, n, self.block_mean(block, n))
        return self

    def _update_torch(self, x, mask) -> StreamingCovariance:
        import torch

        from capscale.spectrum import _torch

        n_rows = self.batch_rows(x)
        t = x if is_torch(x) else torch.from_numpy(np.asarray(x))
        t = t.detach().to(self._moments.device)
        keep = None
        if mask is not None:
            m = mask.reshape(-1) if is_torch(mask) else torch.from_numpy(np.asarray(mask).reshape(-1))
            _check_mask(m.shape[0], n_rows, x)
            keep = m.to(t.device).bool()
        grouping = _torch.group_rows(n_rows, keep, None, 1)
        dtype = torch_dtype(self.dtype)
        _torch.accumulate(t, grouping, dtype, self._scratch, None, self._moments, self._refuse)
        return self

    @staticmethod
    def _refuse(reason: str) -> NonFiniteError:
        return NonFiniteError(f"activations refused: {reason}")

    def _host_rows(self, x, mask):
        """``[n, D]`` host view of the kept rows (not yet converted or copied where avoidable)."""
        n_rows = self.batch_rows(x)
        rows = host_rows(x).reshape(n_rows, self.dim)
        if mask is not None:
            m = to_numpy(mask).reshape(-1)
            _check_mask(m.shape[0], n_rows, x)
            rows = rows[m.astype(bool)]
        return rows

    def block_mean(self, block: np.ndarray, n: int) -> np.ndarray:
        """Mean of the host rows ``block[:n]``, refusing NaN/Inf and values whose scatter would overflow.

        A NaN/Inf anywhere in a column makes its mean non-finite (a D-length check);
        the largest |x| bounds every column's sum of squared deviations.
        """
        rows = block[:n]
        mean = rows.mean(0)
        if not np.isfinite(mean).all():
            raise NonFiniteError(f"activations refused: NaN or Inf ({n} rows, D={self.dim})")
        lo, hi = float(rows.min()), float(rows.max())
        if max(hi - lo, -lo, hi) > math.sqrt(_overflow_limit(self.dtype) / n):  # as the torch backend
            top = max(-lo, hi)
            raise NonFiniteError(
                f"activations refused: values too large: max |x| = {top:.3g} over {n} rows "
                f"would overflow the {self.dtype} scatter (D={self.dim})"
            )
        return mean

    def add_block(self, block: np.ndarray, n: int, batch_mean: np.ndarray) -> None:
        """Add host rows ``block[:n]`` (scratch; ``block[n]`` is a free row) with their ``block_mean``.

        Centred rows plus one row √(n_a n_b / n)·(mean_b − mean_a) give, in a single
        syrk, the batch scatter and Chan's between-means term, added into the state in place.
        """
        block[:n] -= batch_mean
        if self._count == 0:
            self._count, self._mean = n, batch_mean
            self._scatter[...] = 0
            k = n
        else:
            total = self._count + n
            delta = batch_mean - self._mean
            block[n] = delta * np.sqrt(self._count * n / total)
            self._mean = self._mean + delta * (n / total)
            self._count, k = total, n + 1
        _syrk_lower_(self._scatter, block[:k])
        self._half = True

    def _combine_host(self, n_b: int, mean_b, scatter_b) -> None:
        """NumPy backend, Chan et al.: merge moments (n_b, mean_b, scatter_b), which this object now owns."""
        n_a = self._count
        if n_a == 0:
            self._count, self._mean, self._scatter, self._half = n_b, mean_b, scatter_b, False
            return
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter += scatter_b  # in place, lower triangle: no D×D temporaries
        syr = _blas.dsyr if self._scatter.dtype == np.float64 else _blas.ssyr
        syr(n_a * n_b / n, delta, lower=0, a=self._scatter.T, overwrite_a=1)
        self._half = True
        self._count = n

    def merge(self, other: StreamingCovariance) -> StreamingCovariance:
        """Fold ``other`` into this state exactly (``other`` is left unchanged)."""
        if not isinstance(other, StreamingCovariance):
            raise TypeError(f"can only merge a StreamingCovariance, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge D={other.dim} into D={self.dim}")
        if not other.count:
            return self
        if self._moments is not None:  # the torch accumulator takes any moments (only read)
            self._moments.add(
                other.count, self._adopt(other.mean), other.scatter if other.uses_torch else self._adopt(other.scatter)
            )
        elif self._count and self._native(other):  # read-only use: no copy of other's D×D state
            self._combine_host(other.count, other.mean, other._scatter)
        else:
            self._combine_host(other.count, self._adopt(other.mean), self._adopt(other.scatter))
        return self

    def _native(self, other: StreamingCovariance) -> bool:
        return other.dtype == self.dtype and other.device is None

    def copy(self) -> StreamingCovariance:
        out = object.__new__(StreamingCovariance)
        out.dim, out.dtype, out.device, out._moments = self.dim, self.dtype, self.device, None
        if self._moments is not None:
            out._moments, out._scratch = self._moments.copy(), type(self._scratch)()
        else:
            out._count, out._mean = self._count, self._mean.copy()
            out._scatter, out._half = self._scatter.copy(), self._half
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
        """Covariance eigenvalues, descending, float64 NumPy, round-off clamped (see ``clamp_spectrum``)."""
        return eigenvalues_from_covariance(self.covariance())

    def summary(self, **kwargs) -> dict:
        """``spectrum_summary`` of this state; fewer than 2 samples → an 'insufficient' record."""
        from capscale.spectrum.summary import spectrum_summary

        if self.count < 2:
            return spectrum_summary(None, self.count, dim=self.dim, **kwargs)
        cov = self.covariance()
        diag = np.diag(cov) if self.device is None else cov.diagonal().cpu().numpy()
        return spectrum_summary(eigenvalues_from_covariance(cov), self.count, dim=self.dim, variances=diag, **kwargs)

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
        if obj._moments is not None:
            obj._moments.load(count, mean, scatter)
        else:
            obj._count, obj._mean, obj._scatter, obj._half = count, mean, scatter, False
        return obj

    def __repr__(self) -> str:
        where = "numpy" if self.device is None else f"torch:{self.device}"
        return f"StreamingCovariance(dim={self.dim}, count={self.count}, dtype={self.dtype}, {where})"
