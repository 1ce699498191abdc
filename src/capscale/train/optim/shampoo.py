"""``shampoo``: Kronecker-factored preconditioner L^-1/4 · M · R^-1/4 of the momentum, per
tile of at most ``block_size``², roots by ``eigh`` in float64 every ``precondition_every``
steps, grafted to AdamW's (or SGD's) per-matrix update norm (Gupta et al. 2018; grafting as
in Anil et al. 2020). Our own: the maintained packages did not fit (see
:class:`ShampooConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from capscale.train.optim._registry import MatrixConfig, check_betas, check_choice, check_int, check_number, register

GRAFTS = ("adamw", "sgd", "none")


def inverse_root(S: Tensor, root: int, eps: float) -> Tensor:
    """``(S + eps·λ_max·I)^(-1/root)`` of a symmetric PSD ``S``, via float64 ``eigh``.

    The regulariser is relative to λ_max, so the result's shape does not depend
    on the gradient's scale. An all-zero ``S`` (no signal yet) gives the identity.
    """
    S64 = S.double()
    if not bool(torch.isfinite(S64).all()):
        raise FloatingPointError("Shampoo statistics are not finite: the run has diverged")
    S64 = (S64 + S64.T) / 2  # remove round-off asymmetry before eigh
    lam, V = torch.linalg.eigh(S64)
    top = float(lam[-1])
    if not top > 0.0:
        return torch.eye(S.size(0), dtype=S.dtype, device=S.device)
    lam = lam.clamp(min=0.0) + eps * top
    return ((V * lam.pow(-1.0 / root)) @ V.T).to(S.dtype)


def shampoo_tiles(shape: torch.Size | tuple[int, ...], block_size: int) -> list[tuple[slice, slice]]:
    """Row-major tiles of at most ``block_size`` × ``block_size`` covering a matrix.

    Each tile gets its own Kronecker factors (blocked Shampoo, as in Anil et al.
    2020 and Shi et al. 2023), which bounds the factor size and the ``eigh`` cost.
    """
    rows, cols = shape[0], shape[1]
    return [
        (slice(r, min(r + block_size, rows)), slice(c, min(c + block_size, cols)))
        for r in range(0, rows, block_size)
        for c in range(0, cols, block_size)
    ]


@register("shampoo")
@dataclass(frozen=True)
class ShampooConfig(MatrixConfig):
    """Our own Shampoo. Checked first (torch 2.13, CPU): pytorch-optimizer 4.1.0's
    ``ScalableShampoo`` keeps Python objects in its state (not loadable with
    ``torch.load(weights_only=True)``, so no safe exact resume) and its ``Shampoo``
    overwrites ``p.grad`` and has no grafting; heavyball 3.2.1 ships only KL-Shampoo
    (a different method) and is built around ``torch.compile``; Meta's
    distributed Shampoo is not on PyPI.

    ``lr`` is AdamW's: grafting gives each matrix AdamW's update norm
    (``graft="none"``: plain Shampoo). ``matrix_eps`` regularises each factor
    relative to its largest eigenvalue. Matrices are tiled into blocks of at most
    ``block_size`` per side, each with its own factors: a 2048-wide FFN side costs
    four 512² ``eigh`` instead of one 2048² (16× less), which keeps the CPU study's
    widest runs affordable; raise it on a GPU for fewer, larger blocks.
    """

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_every: int = 10
    matrix_eps: float = 1e-6
    block_size: int = 512
    graft: str = "adamw"

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_number(name, "lr", self.lr, 0.0, lo_open=True)
        check_betas(name, self, "betas")
        check_number(name, "eps", self.eps, 0.0, lo_open=True)
        check_number(name, "weight_decay", self.weight_decay, 0.0)
        check_int(name, "precondition_every", self.precondition_every, 1)
        check_number(name, "matrix_eps", self.matrix_eps, 0.0, lo_open=True)
        check_int(name, "block_size", self.block_size, 1)
        check_choice(name, "graft", self.graft, GRAFTS)
        self._check_adamw()

    @staticmethod
    def rule(opt: Optimizer, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g, state = p.grad, opt.state[p]
            tiles = shampoo_tiles(p.shape, group["block_size"])
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                for k, (rs, cs) in enumerate(tiles):
                    for side, n in (("L", rs.stop - rs.start), ("R", cs.stop - cs.start)):
                        state[f"{side}{k}"] = torch.zeros(n, n, dtype=p.dtype, device=p.device)
                        state[f"{side}root{k}"] = torch.eye(n, dtype=p.dtype, device=p.device)
            state["step"] += 1
            t = state["step"]
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            refresh = (t - 1) % group["precondition_every"] == 0
            m_hat = state["exp_avg"] / (1 - beta1**t)
            update = torch.empty_like(m_hat)
            for k, (rs, cs) in enumerate(tiles):
                gk = g[rs, cs]
                state[f"L{k}"].mul_(beta2).addmm_(gk, gk.T, alpha=1 - beta2)  # L ← β L + (1−β) G Gᵀ
                state[f"R{k}"].mul_(beta2).addmm_(gk.T, gk, alpha=1 - beta2)  # R ← β R + (1−β) Gᵀ G
                if refresh:
                    for side in ("L", "R"):
                        state[f"{side}root{k}"].copy_(inverse_root(state[f"{side}{k}"], 4, group["matrix_eps"]))
                update[rs, cs] = state[f"Lroot{k}"] @ m_hat[rs, cs] @ state[f"Rroot{k}"]
            if group["graft"] != "none":
                # grafting: Shampoo's direction with AdamW's (or SGD's) step length per matrix
                if group["graft"] == "adamw":
                    graft = m_hat / (state["exp_avg_sq"] / (1 - beta2**t)).sqrt().add_(eps)
                else:
                    graft = m_hat
                update.mul_(graft.norm() / update.norm().clamp(min=1e-30))
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr)
