"""When to look: which training steps are measured, and for how many steps at a time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Measure on steps where ``step % every == 0``, and a final window that ends training.

    A measurement started at step ``s`` accumulates every forward of steps
    ``s .. s + window - 1`` (all micro-batches of a step belong to it) and is
    labelled ``s``. ``window <= every`` so that windows never overlap. With
    ``total_steps`` known, the final window starts at ``total_steps - window`` (a
    full window: the last measurement is as well sampled as the others), or where
    the last regular window before it ends, if that is later; a regular window that
    would start inside it is not started.
    """

    every: int = 200
    window: int = 1
    total_steps: int | None = None

    def __post_init__(self):
        for name in ("every", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.window > self.every:
            raise ValueError(f"window ({self.window}) must not exceed every ({self.every}): windows would overlap")
        t = self.total_steps
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"total_steps must be an int >= 1 or None, got {t!r}")

    def starts_at(self, step: int) -> bool:
        last = self.last_step
        if last is None:
            return step % self.every == 0
        return step < self.total_steps and (step == last or (step < last and step % self.every == 0))

    @property
    def last_step(self) -> int | None:
        """The start of the final window (None without ``total_steps``)."""
        if self.total_steps is None:
            return None
        full = max(self.total_steps - self.window, 0)
        regular = full - full % self.every  # the last regular start at or before it
        if regular + self.window >= self.total_steps:
            return regular  # that window already reaches the end of training
        return max(full, regular + self.window)

    def end(self, start: int) -> int:
        """Exclusive end step of the window started at ``start`` (cut at the end of training)."""
        end = start + self.window
        return end if self.total_steps is None else min(end, self.total_steps)
