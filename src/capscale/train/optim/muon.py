"""``muon``: Nesterov momentum → Newton–Schulz orthogonalisation (fp32 on CPU, bf16
allowed on CUDA) → step scaled by √max(1, rows/cols) (Keller Jordan's Muon, the same as
``torch.optim.Muon``'s default)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from capscale.train.optim._registry import MatrixConfig, check_choice, check_int, check_number, register

# Newton–Schulz quintic coefficients (Keller Jordan's Muon; also torch.optim.Muon's)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_DTYPES = ("auto", "float32", "bfloat16")


def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximate orthogonalisation U·S'·Vᵀ ≈ U·Vᵀ of a 2-D ``G`` (S' ∈ ~[0.7, 1.2]).

    Quintic Newton–Schulz iteration computed in ``dtype`` (``ns_dtype="auto"``: fp32 on
    CPU, bf16 on CUDA, as Keller Jordan's Muon); returned in ``G``'s dtype.
    """
    if G.dim() != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    wide = G.size(0) > G.size(1)
    if wide:  # iterate on the short side: X Xᵀ is the smaller Gram matrix
        X = X.T
    X = X.div(X.norm().clamp(min=NS_EPS))  # Frobenius ≥ spectral norm, so σ ≤ 1
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.addmm(X, B, X, beta=a)  # a·X + B·X
    return (X.T if wide else X).to(G.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Muon's shape factor √max(1, rows/cols): equal per-entry update RMS across shapes."""
    rows, cols = shape[0], shape[1]
    return math.sqrt(max(1.0, rows / cols))


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def muon_momentum(opt: Optimizer, p: Tensor, group: dict) -> tuple[dict, Tensor]:
    """Update p's momentum buffer; return (state, Nesterov-or-plain momentum direction)."""
    state, g, mu = opt.state[p], p.grad, group["momentum"]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p)
    buf = state["momentum_buffer"]
    buf.lerp_(g, 1 - mu)
    return state, (g.lerp(buf, mu) if group["nesterov"] else buf)


@register("muon")
@dataclass(frozen=True)
class MuonConfig(MatrixConfig):
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.01
    ns_steps: int = 5
    ns_dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_number(name, "lr", self.lr, 0.0, lo_open=True)
        check_number(name, "momentum", self.momentum, 0.0, 1.0, hi_open=True)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"{name}.nesterov must be a bool, got {self.nesterov!r}")
        check_number(name, "weight_decay", self.weight_decay, 0.0)
        check_int(name, "ns_steps", self.ns_steps, 1)
        check_choice(name, "ns_dtype", self.ns_dtype, NS_DTYPES)
        self._check_adamw()

    @staticmethod
    def rule(opt: Optimizer, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            _, direction = muon_momentum(opt, p, group)
            update = newton_schulz(direction, group["ns_steps"], ns_dtype(group["ns_dtype"], p.device))
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * muon_scale(p.shape))
