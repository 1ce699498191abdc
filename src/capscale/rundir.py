"""The run directory: the contract between train, sweep, analysis and users' own loops.

Torch-free, so every layer (analysis and report included) reads run directories
through this one module; the format is documented in ``docs/run-format.md``.

``config.json`` · ``metrics.jsonl`` · ``spectra.parquet`` · ``status.json`` ·
``checkpoints/``. Whole files are written atomically (temp file + rename);
metrics and spectra are append-only: on resume they are first truncated back to
the checkpoint's step, so a resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd

from capscale.atomic import atomic_write_bytes

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SPECTRA_FILE = "spectra.parquet"
STATUS_FILE = "status.json"
CHECKPOINT_DIR = "checkpoints"


class RunStatus(str, Enum):
    """A run's state in ``status.json``; compares equal to its string value."""

    RUNNING = "running"
    DONE = "done"
    DIVERGED = "diverged"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """Done or diverged: a sweep does not run it again (a failed run is retried)."""
        return self in (RunStatus.DONE, RunStatus.DIVERGED)


STATUSES = tuple(s.value for s in RunStatus)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Run state, durably: fsync'd before the rename."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode(), fsync=True)


def _json_default(o: Any):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite_or_none(v: Any) -> Any:
    # JSON has no NaN/Inf: a diverged loss is written as null, its status says why
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def spectra_path(self) -> Path:
        return self.path / SPECTRA_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def create(self) -> None:
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create run directory {self.path}: {exc.strerror}") from exc
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"run directory {self.path} is not writable")

    # config / status
    def read_config(self) -> dict | None:
        return json.loads(self.config_path.read_text()) if self.config_path.exists() else None

    def write_config(self, cfg: dict) -> None:
        atomic_write_json(self.config_path, cfg)

    def read_status(self) -> dict | None:
        return json.loads(self.status_path.read_text()) if self.status_path.exists() else None

    def write_status(self, status: RunStatus | str, step: int, reason: str | None = None, **extra: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        atomic_write_json(self.status_path, {"status": str(RunStatus(status)), "step": step, "reason": reason, **extra})

    # metrics
    def append_metrics(self, records: list[dict]) -> None:
        if not records:
            return
        lines = "".join(
            json.dumps({k: _finite_or_none(v) for k, v in r.items()}, default=_json_default) + "\n" for r in records
        )
        with open(self.metrics_path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill: everything before it stands
        return out

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only records with step <= last_step (resume from that checkpoint)."""
        kept = [r for r in self.read_metrics() if r.get("step", -1) <= last_step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode(), fsync=True)

    # spectra
    def append_spectra(self, frame: pd.DataFrame) -> None:
        """Append rows to spectra.parquet (rewritten atomically: one file, readable at any instant)."""
        if frame is None or frame.empty:
            return
        old = self.read_spectra()
        new = frame if old is None else pd.concat([old, frame], ignore_index=True)
        self._write_spectra(new)

    def _write_spectra(self, frame: pd.DataFrame) -> None:
        import io

        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        atomic_write_bytes(self.spectra_path, buf.getvalue(), fsync=True)

    def read_spectra(self) -> pd.DataFrame | None:
        return pd.read_parquet(self.spectra_path) if self.spectra_path.exists() else None

    def truncate_spectra(self, last_step: int) -> None:
        old = self.read_spectra()
        if old is not None:
            self._write_spectra(old[old["step"] <= last_step].reset_index(drop=True))
