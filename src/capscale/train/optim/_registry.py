"""The optimizer registry, the hybrid optimizer that runs its rules, and shared checks.

One declaration per optimizer: a frozen config dataclass decorated with
:func:`register`, whose ``rule`` staticmethod updates one parameter group. The
tables (``OPTIMIZERS``, ``RULES``, the hyperparameters each group must carry,
which rules take matrices only) are all derived from it here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

ROLES = ("matrix", "embed", "head")

Rule = Callable[[Optimizer, dict], None]


@dataclass(frozen=True)
class OptimizerSpec:
    """What the registry knows of one optimizer, all read off its config class."""

    name: str
    config: type
    rule: Rule
    keys: tuple[str, ...]  # hyperparameters a group of this rule carries (besides lr, base_lr)
    matrix_only: bool  # the rule updates 2-D matrices; embeddings and head get AdamW


SPECS: dict[str, OptimizerSpec] = {}
OPTIMIZERS: dict[str, type] = {}  # name → config class
RULES: dict[str, Rule] = {}  # name → update rule


def register(name: str) -> Callable[[type], type]:
    """Class decorator: declare optimizer ``name`` by its config dataclass.

    The class gives the defaults and checks (``__post_init__``), the update
    ``rule(opt, group)`` as a staticmethod, and its parameter groups. A subclass of
    :class:`MatrixConfig` is a matrix rule: every field except ``lr`` and the
    ``adamw_*`` fields is a hyperparameter of the matrix group.
    """

    def decorate(cls: type) -> type:
        if name in SPECS:
            raise ValueError(f"optimizer {name!r} is declared twice")
        matrix_only = issubclass(cls, MatrixConfig)
        side = {f.name for f in fields(MatrixConfig)} if matrix_only else set()
        keys = tuple(f.name for f in fields(cls) if f.name != "lr" and f.name not in side)
        cls.name = name
        SPECS[name] = OptimizerSpec(name, cls, cls.rule, keys, matrix_only)
        OPTIMIZERS[name] = cls
        RULES[name] = cls.rule
        return cls

    return decorate


class HybridOptimizer(Optimizer):
    """One optimizer whose parameter groups each follow their own update ``rule``.

    Each group is a dict with ``params``, ``rule`` (a key of :data:`RULES`),
    ``lr``, ``base_lr`` and the rule's hyperparameters; usually built by
    :func:`build_optimizer`.
    """

    def __init__(self, param_groups: list[dict[str, Any]]):
        for group in param_groups:
            rule = group.get("rule")
            if rule not in SPECS:
                raise ValueError(f"param group rule must be one of {sorted(SPECS)}, got {rule!r}")
            spec = SPECS[rule]
            missing = [k for k in ("lr", "base_lr", *spec.keys) if k not in group]
            if missing:
                raise ValueError(f"param group with rule {rule!r} lacks {missing}")
            if spec.matrix_only:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(
                            f"rule {rule!r} updates 2-D matrices only, got a parameter of "
                            f"shape {tuple(p.shape)}; put it in an 'adamw' group"
                        )
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            RULES[group["rule"]](self, group)
        return loss


# --------------------------------------------------------------------------- checks


def check_number(
    cls: str, name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{cls}.{name} must be a number in {interval}, got {value!r}")


def check_int(cls: str, name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{cls}.{name} must be an int ≥ {lo}, got {value!r}")


def check_betas(cls: str, obj: Any, name: str) -> None:
    betas = getattr(obj, name)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{cls}.{name} must be a pair (beta1, beta2), got {betas!r}")
    for b in betas:
        check_number(cls, name, b, 0.0, 1.0, hi_open=True)
    object.__setattr__(obj, name, (float(betas[0]), float(betas[1])))  # lists from TOML/JSON


def check_choice(cls: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{cls}.{name} must be one of {choices}, got {value!r}")


def adamw_group(params: list, role: str, lr: float, betas: tuple, eps: float, wd: float) -> dict:
    """A parameter group updated by the ``adamw`` rule."""
    return {
        "params": params,
        "role": role,
        "rule": "adamw",
        "lr": lr,
        "base_lr": lr,
        "betas": betas,
        "eps": eps,
        "weight_decay": wd,
    }


@dataclass(frozen=True)
class MatrixConfig:
    """Base of matrix rules: the named rule on the hidden matrices, AdamW (no decay) on embed/head.

    A subclass declares ``lr`` and the rule's hyperparameters as fields.
    """

    name: ClassVar[str]  # set by @register
    adamw_lr: float = 3e-3
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8

    def _check_adamw(self) -> None:
        name = type(self).__name__
        check_number(name, "adamw_lr", self.adamw_lr, 0.0, lo_open=True)
        check_betas(name, self, "adamw_betas")
        check_number(name, "adamw_eps", self.adamw_eps, 0.0, lo_open=True)

    def param_groups(self, roles: dict[str, list]) -> list[dict]:
        hyper = {k: getattr(self, k) for k in SPECS[self.name].keys}
        matrix = {"params": roles["matrix"], "role": "matrix", "base_lr": self.lr, "rule": self.name, **hyper}
        matrix["lr"] = self.lr
        return [matrix] + [
            adamw_group(roles[r], r, self.adamw_lr, self.adamw_betas, self.adamw_eps, 0.0) for r in ("embed", "head")
        ]


# --------------------------------------------------------------------------- by name


def optimizer_config(name: str, **overrides: Any):
    """The resolved hyperparameters of optimizer ``name`` (a frozen dataclass)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    valid = sorted(f.name for f in fields(cls))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; valid: {valid}")
    return cls(**overrides)


def optimizer_defaults(name: str) -> dict[str, Any]:
    """Default hyperparameters of optimizer ``name`` as a plain dict."""
    return asdict(optimizer_config(name))


def build_optimizer(name: str, model: nn.Module, **overrides: Any) -> HybridOptimizer:
    """Optimizer ``name`` for ``model`` (which must provide ``param_groups()`` with the
    roles "matrix", "embed" and "head", as :class:`capscale.train.model.GPT` does)."""
    config = optimizer_config(name, **overrides)
    if not callable(getattr(model, "param_groups", None)):
        raise TypeError(
            f"{type(model).__name__} has no param_groups(); build_optimizer needs a model "
            "that sorts its parameters into 'matrix', 'embed' and 'head'"
        )
    roles = model.param_groups()
    if set(roles) != set(ROLES):
        raise ValueError(f"model.param_groups() must have keys {ROLES}, got {sorted(roles)}")
    groups = [g for g in config.param_groups(roles) if g["params"]]
    return HybridOptimizer(groups)
