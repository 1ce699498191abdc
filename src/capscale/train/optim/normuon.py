"""``normuon``: Muon, then each row (output neuron) of the orthogonalised update is divided
by the root of an EMA of its mean square, and the whole update is rescaled to the
orthogonalised update's Frobenius norm (Li et al. 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from capscale.train.optim._registry import check_number, register
from capscale.train.optim.muon import MuonConfig, muon_momentum, muon_scale, newton_schulz, ns_dtype


@register("normuon")
@dataclass(frozen=True)
class NorMuonConfig(MuonConfig):
    beta2: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(type(self).__name__, "beta2", self.beta2, 0.0, 1.0, hi_open=True)

    @staticmethod
    def rule(opt: Optimizer, group: dict) -> None:
        lr, wd, beta2 = group["lr"], group["weight_decay"], group["beta2"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state, direction = muon_momentum(opt, p, group)
            ortho = newton_schulz(direction, group["ns_steps"], ns_dtype(group["ns_dtype"], p.device)).float()
            if "second_momentum" not in state:
                state["second_momentum"] = torch.zeros_like(p[:, :1])  # one per row (neuron)
            v = state["second_momentum"]
            frob = ortho.norm()
            v.lerp_(ortho.square().mean(dim=1, keepdim=True).to(v.dtype), 1 - beta2)
            ortho.div_(v.float().sqrt().add_(1e-10))
            # keep the orthogonalised update's Frobenius norm: only its row balance changes
            ortho.mul_(frob / ortho.norm().add_(1e-10))
            p.mul_(1 - lr * wd)
            p.add_(ortho.to(p.dtype), alpha=-lr * muon_scale(p.shape))
