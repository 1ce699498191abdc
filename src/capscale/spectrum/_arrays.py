"""NumPy/torch array plumbing for the spectral core.

The core is NumPy-only: torch is imported lazily, and only when a caller hands
in a torch tensor or asks for a torch device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NP_DTYPES = {"float64": np.float64, "float32": np.float32}

# A batch is refused when its scatter could reach this fraction of the GEMM
# dtype's largest value: headroom for summing 2**16 such batches in a state.
OVERFLOW_HEADROOM = 2.0**-16


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def dtype_name(dtype: Any) -> str:
    """Normalise a dtype given as str, NumPy or torch dtype to 'float64'/'float32'."""
    name = str(dtype).replace("torch.", "").replace("<class 'numpy.", "").rstrip("'>")
    name = {"double": "float64", "float": "float32", "f8": "float64", "f4": "float32"}.get(name, name)
    if name not in _NP_DTYPES:
        raise ValueError(f"accumulator dtype must be float64 or float32, got {dtype!r}")
    return name


def to_numpy(x: Any, dtype: str | None = None) -> np.ndarray:
    """Host NumPy view/copy of an array or tensor, optionally cast."""
    if is_torch(x):
        x = x.detach()
        if dtype is not None:
            import torch

            x = x.to(getattr(torch, dtype))  # cast on the tensor's device first
        return x.cpu().numpy()
    return np.asarray(x, dtype=None if dtype is None else _NP_DTYPES[dtype])


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)
