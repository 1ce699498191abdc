"""capscale.train: controlled pretraining runs (model, data, optimizers, loop).

Imports torch. May use ``capscale.spectrum`` and ``capscale.probe``, never the reverse.
"""

from capscale.train.model import GPT, GPTConfig
from capscale.train.optim import (
    OPTIMIZERS,
    HybridOptimizer,
    build_optimizer,
    optimizer_config,
)

__all__ = [
    "GPT",
    "OPTIMIZERS",
    "GPTConfig",
    "HybridOptimizer",
    "build_optimizer",
    "optimizer_config",
]
