"""A run directory written from any training loop: ``capscale.attach(model, out=RUN_DIR, run_config={...})``.

The same format as capscale's harness (``docs/run-format.md``), through
:class:`capscale.rundir.RunDir`'s atomic writes: ``config.json`` and
``status.json`` ("running") at attach, spectra after every measurement window,
metrics from ``probe.log``, status "done" (or "failed", or "diverged" after a refused
non-finite activation) on close. A run killed
mid-way stays "running": the report lists it as unfinished and never analyses it.
The writer holds the run directory's lock from attach to close, so a second loop
pointed at the same directory is refused at once, naming the holder.
"""

from __future__ import annotations

import contextlib
import numbers
from pathlib import Path
from typing import Any

import pandas as pd

from capscale.probe.sinks import Sink
from capscale.rundir import RunDir, RunStatus
from capscale.runformat import make_config
from capscale.runowner import RunOwner


class RunWriter(Sink):
    """The run-directory sink behind ``attach(out=...)``; its ``log`` is ``probe.log``."""

    def __init__(
        self, out, run_config, *, start_step: int = 0, total_steps: int | None = None, writer="capscale.attach"
    ):
        path = Path(out)
        config = make_config(run_config, name=str((run_config or {}).get("name") or path.name), writer=writer)
        if total_steps is not None:
            config["train"].setdefault("steps", int(total_steps))  # the step budget, unless said otherwise
        owner = RunOwner(path, what="run_config", advice="give each run its own out= directory")
        run = owner.run
        if path.exists() and not path.is_dir():
            raise ValueError(f"out={str(path)!r} is a file, not a run directory")
        self._lock = contextlib.ExitStack()
        # RunLockedError (a ValueError) names the other writer; not re-entrant: a second
        # attach(out=SAME) in this process (a notebook cell run again) is refused too.
        self._lock.enter_context(owner.lock(reentrant=False))
        try:
            old_status, old_config = _read_existing(run)
            if old_status is not None and old_status.get("status") == RunStatus.DONE:
                raise ValueError(f"{path} already holds a finished run; give each run its own out= directory")
            owner.refuse_other_run(config, _comparable, old=old_config)
            owner.begin(config, int(start_step))
        except BaseException:
            self._lock.close()  # refused: the directory is as it was (the lock removes what it made)
            raise
        self.owner, self.run, self.config = owner, run, config
        self._pending: dict[str, Any] | None = None  # the current step's metrics, merged until the step changes

    @property
    def path(self) -> Path:
        return self.run.path

    def write_spectra(self, frame: pd.DataFrame) -> None:
        if frame is not None and not frame.empty:
            self.run.append_spectra(frame)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` record per step: calls for the same step merge (later values win)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"probe.log: step must be an int >= 0, got {step!r}")
        clean = {}
        for key, value in metrics.items():
            if key == "step":
                raise ValueError("probe.log: give the step as the first argument, not as a metric")
            if hasattr(value, "item"):  # a 0-d tensor or NumPy scalar
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
                raise ValueError(f"probe.log: metric {key!r} must be a number or a string, got {type(value).__name__}")
            clean[key] = float(value) if isinstance(value, numbers.Real) else value
        if self._pending is not None and self._pending["step"] != int(step):
            self.flush_metrics()
        if self._pending is None:
            self._pending = {"step": int(step)}
        self._pending.update(clean)

    def flush_metrics(self) -> None:
        if self._pending is not None:
            record, self._pending = self._pending, None
            self.run.append_metrics([record])

    def finish(self, step: int, error: str | None = None, diverged: bool = False) -> None:
        """Status "done" at ``step``, or "failed" with the error ("diverged" with ``diverged``:
        a non-finite activation, as the harness records it); pending metrics are written first."""
        try:
            self.flush_metrics()
            if diverged:
                self.owner.set_status(RunStatus.DIVERGED, step, error)
            elif error is None:
                self.owner.set_status(RunStatus.DONE, step)
            else:
                self.owner.set_status(RunStatus.FAILED, step, error)
        finally:
            self._lock.close()


def check_run_config(out, run_config) -> None:
    """Refuse a bad ``out`` / ``run_config`` pair now (e.g. when a callback is made), not at train start."""
    if out is None and run_config is not None:
        raise ValueError("run_config is written to a run directory: give out=RUN_DIR too")
    if out is not None:
        make_config(run_config, name="check", writer="check")


def _read_existing(run: RunDir) -> tuple[dict | None, dict | None]:
    try:
        return run.read_status(), run.read_config()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{run.path} holds an unreadable run ({exc}); give each run its own out= directory") from exc


def _comparable(cfg: dict) -> dict:
    # A resumed run may learn its step budget only now; the rest must match.
    out = {k: v for k, v in cfg.items() if k != "train"}
    out["train"] = {k: v for k, v in (cfg.get("train") or {}).items() if k != "steps"}
    return out
