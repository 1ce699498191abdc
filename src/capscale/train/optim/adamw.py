"""``adamw``: decoupled weight decay; the arithmetic of ``torch.optim.AdamW``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from capscale.train.optim._registry import ROLES, adamw_group, check_betas, check_number, register


@register("adamw")
@dataclass(frozen=True)
class AdamWConfig:
    """AdamW everywhere; weight decay on the hidden matrices only (paper)."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_number(name, "lr", self.lr, 0.0, lo_open=True)
        check_betas(name, self, "betas")
        check_number(name, "eps", self.eps, 0.0, lo_open=True)
        check_number(name, "weight_decay", self.weight_decay, 0.0)

    def param_groups(self, roles: dict[str, list]) -> list[dict]:
        return [
            adamw_group(roles[r], r, self.lr, self.betas, self.eps, self.weight_decay if r == "matrix" else 0.0)
            for r in ROLES
        ]

    @staticmethod
    def rule(opt: Optimizer, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g, state = p.grad, opt.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            # same operation order as torch.optim.AdamW (single-tensor path)
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**t)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)
