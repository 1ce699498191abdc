"""``dion``: low-rank orthonormal update by one power iteration with QR, error feedback into
the momentum, column-normalised right factor (Ahn et al. 2025, Algorithm 1); scaled like
Muon so that at full rank it takes Muon's step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from capscale.train.optim._registry import MatrixConfig, check_int, check_number, register
from capscale.train.optim.muon import muon_scale


def dion_rank(shape: torch.Size | tuple[int, ...], rank_fraction: float) -> int:
    """Dion's rank r = ⌈rank_fraction · min(rows, cols)⌉ (at least 1)."""
    return max(1, math.ceil(rank_fraction * min(shape[0], shape[1])))


@register("dion")
@dataclass(frozen=True)
class DionConfig(MatrixConfig):
    lr: float = 0.02
    momentum: float = 0.95  # Dion's μ
    weight_decay: float = 0.01
    rank_fraction: float = 0.25  # the paper sweeps 1/2 … 1/16
    eps: float = 1e-8
    seed: int = 0  # seeds the initial right factors Q

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_number(name, "lr", self.lr, 0.0, lo_open=True)
        check_number(name, "momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_number(name, "weight_decay", self.weight_decay, 0.0)
        check_number(name, "rank_fraction", self.rank_fraction, 0.0, 1.0, lo_open=True)
        check_number(name, "eps", self.eps, 0.0, lo_open=True)
        check_int(name, "seed", self.seed, 0)
        self._check_adamw()

    @staticmethod
    def rule(opt: Optimizer, group: dict) -> None:
        lr, wd, mu, eps = group["lr"], group["weight_decay"], group["momentum"], group["eps"]
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = opt.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p)
                # Seeded right factor: a run (and its resume) does not depend on global RNG
                gen = torch.Generator().manual_seed(group["seed"] * 1_000_003 + i)
                r = dion_rank(p.shape, group["rank_fraction"])
                state["Q"] = torch.randn(min(p.shape), r, generator=gen, dtype=p.dtype).to(p.device)
            M, Q = state["momentum"], state["Q"]
            M.add_(p.grad)  # B = M + G, in place
            tall = p.size(0) >= p.size(1)
            B = M if tall else M.T  # [long side, short side]; a view, so edits reach M
            P = torch.linalg.qr((B @ Q).float()).Q.to(B.dtype)  # [long, r], orthonormal columns
            R = B.T @ P  # [short, r]
            p.mul_(1 - lr * wd)
            if not bool(R.any()):  # zero momentum (e.g. a zero-initialised layer): keep Q
                continue
            B.sub_(P @ R.T, alpha=1 - mu)  # error feedback: M = B − (1−μ)·P·Rᵀ
            Q.copy_(R / R.norm(dim=0, keepdim=True).add_(eps))  # column normalisation
            update = P @ Q.T
            p.add_(update if tall else update.T, alpha=-lr * muon_scale(p.shape))
