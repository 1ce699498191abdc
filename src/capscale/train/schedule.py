"""Learning-rate schedules as a factor of each group's base LR."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, *, kind: str = "warmdown", warmup: int = 0, warmdown_frac: float = 0.2) -> float:
    """Factor for 0-based ``step`` of ``total``.

    ``warmdown`` (the paper's): optional linear warmup, constant, then linear decay
    to 0 over the last ``warmdown_frac`` of training. ``cosine``: warmup, then cosine
    to 0. ``constant``: warmup, then 1.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
    if kind == "warmdown":
        decay = int(round(warmdown_frac * total))
        start = total - decay
        return 1.0 if step < start or decay == 0 else (total - step) / decay
    raise ValueError(f"unknown schedule {kind!r}; choose warmdown, cosine or constant")
