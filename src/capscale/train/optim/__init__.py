"""Optimizers by name: ``build_optimizer("muon", model, lr=0.01)``.

Each name gives one :class:`HybridOptimizer`: a ``torch.optim.Optimizer`` whose
parameter groups each carry an update ``rule``. The hidden 2-D matrices of the
blocks (``model.param_groups()["matrix"]``) get the named rule; embeddings and
the head get AdamW without weight decay. The paper runs them on Lion/AdamW; we
pick AdamW with the AdamW baseline's defaults, so that runs differ only in how
the hidden matrices are updated.

Every group carries ``base_lr``; the training loop sets
``group["lr"] = group["base_lr"] * schedule_factor`` before each step. State is
tensors and plain numbers only, so ``state_dict()`` round-trips through
``torch.save`` / ``torch.load(weights_only=True)`` and resumes bit-identically.

One module per optimizer (paper hyperparameters as defaults, docs/conventions.md):
``adamw``, ``muon``, ``normuon``, ``dion``, ``shampoo``. Each declares its config
dataclass with ``@register(name)`` and its update ``rule``; every public module of
this package is imported here, so adding a file is adding an optimizer.
"""

from __future__ import annotations

import importlib
import pkgutil

from capscale.train.optim._registry import (
    OPTIMIZERS,
    ROLES,
    RULES,
    SPECS,
    HybridOptimizer,
    MatrixConfig,
    OptimizerSpec,
    build_optimizer,
    optimizer_config,
    optimizer_defaults,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from capscale.train.optim.adamw import AdamWConfig  # noqa: E402
from capscale.train.optim.dion import DionConfig, dion_rank  # noqa: E402
from capscale.train.optim.muon import NS_COEFFICIENTS, NS_DTYPES, MuonConfig, muon_scale, newton_schulz  # noqa: E402
from capscale.train.optim.normuon import NorMuonConfig  # noqa: E402
from capscale.train.optim.shampoo import GRAFTS, ShampooConfig, inverse_root, shampoo_tiles  # noqa: E402

__all__ = [
    "GRAFTS",
    "NS_COEFFICIENTS",
    "NS_DTYPES",
    "OPTIMIZERS",
    "ROLES",
    "RULES",
    "SPECS",
    "AdamWConfig",
    "DionConfig",
    "HybridOptimizer",
    "MatrixConfig",
    "MuonConfig",
    "NorMuonConfig",
    "OptimizerSpec",
    "ShampooConfig",
    "build_optimizer",
    "dion_rank",
    "inverse_root",
    "muon_scale",
    "newton_schulz",
    "optimizer_config",
    "optimizer_defaults",
    "register",
    "shampoo_tiles",
]
