"""Where records go: files (JSONL, Parquet), dashboards (TensorBoard, W&B) and the console.

A sink receives each finished full measurement as a spectra table
(``write_spectra``) and per-step scalar summaries (``write_scalars``), which
include the cheap monitoring level. File sinks are append-only and atomic:
JSONL appends whole lines with one ``write`` on an ``O_APPEND`` descriptor;
Parquet adds one part file per write to a dataset directory (temp file +
rename), so a reader (or a crash) never sees a half-written file. Every sink checks at
construction that it can write, so a bad path fails at ``attach`` time, not
hours into a run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from capscale.atomic import atomic_write
from capscale.rundir import arrow_table, write_spectra_part


class SinkError(OSError):
    """A sink cannot write where it was told to."""


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SinkError(f"capscale sink: cannot write to directory {str(path)!r}: {exc}") from exc
    return path


FRAME_SUFFIXES = (".parquet", ".jsonl", ".csv")


def check_frame_path(path) -> Path:
    """``path`` if a spectra frame can be written there (known suffix, writable directory)."""
    path = Path(path)
    if path.suffix.lower() not in FRAME_SUFFIXES:
        raise ValueError(f"output must end in {', '.join(FRAME_SUFFIXES)}; got {str(path)!r}")
    _writable_dir(path.parent)
    return path


def write_frame(frame: pd.DataFrame, path) -> Path:
    """Write a spectra frame to ``.parquet``, ``.jsonl`` or ``.csv`` (by suffix), atomically, replacing ``path``."""
    path = check_frame_path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        atomic_write(path, lambda tmp: pq.write_table(arrow_table(frame), tmp))
    elif suffix == ".jsonl":
        atomic_write(path, lambda tmp: Path(tmp).write_text(_jsonl(frame)))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def _jsonl(frame: pd.DataFrame) -> str:
    lines = [
        json.dumps({k: _json_value(v) for k, v in rec.items()}, allow_nan=False)
        for rec in frame.to_dict(orient="records")
    ]
    return "".join(line + "\n" for line in lines)


class Sink:
    """Base sink: override what you store. ``close`` is called once by ``Probe.close``."""

    def write_spectra(self, frame: pd.DataFrame) -> None:
        pass

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None  # strict JSON has no NaN
    if hasattr(v, "tolist"):  # NumPy scalars and arrays
        return _json_value(v.tolist())
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


class JSONLSink(Sink):
    """One JSON object per spectra row, appended to ``path`` (NaN written as null)."""

    def __init__(self, path):
        self.path = Path(path)
        _writable_dir(self.path.parent)

    def write_spectra(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        data = _jsonl(frame).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


class ParquetSink(Sink):
    """Spectra rows as a Parquet dataset at ``path``: one part file per write (per window).

    A write costs the same at window 500 as at window 5 and the sink holds no rows
    between writes; ``pd.read_parquet(path)`` reads the whole dataset. Rows already
    there are kept (a resumed run appends) and never modified; an older
    single-file ``path`` becomes the dataset's first part. The eigenvalues column
    is ``list<double>``.
    """

    def __init__(self, path):
        self.path = Path(path)
        _writable_dir(self.path.parent)

    def write_spectra(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        write_spectra_part(self.path, frame)


class TensorBoardSink(Sink):
    """TensorBoard events (``torch.utils.tensorboard.SummaryWriter``) at the measured step.

    Each measurement: the dashboard scalars (per-layer and median ranks, rank/width,
    N/D, dormant-unit fraction; see ``capscale.probe.dashboard``) and an eigenvalue histogram per site;
    the monitoring level's scalars as they come.
    """

    def __init__(self, log_dir=None, *, writer=None):
        if writer is None:
            if log_dir is None:
                raise ValueError("TensorBoardSink needs a log_dir or a SummaryWriter")
            _writable_dir(Path(log_dir))
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise ImportError("TensorBoardSink needs the tensorboard package: pip install tensorboard") from exc
            writer, self._owned = SummaryWriter(log_dir=str(log_dir)), True
        else:
            self._owned = False
        self.writer = writer

    def write_spectra(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        from capscale.probe.dashboard import dashboard_scalars, eigenvalue_histograms, frame_step

        step = frame_step(frame)
        for k, v in dashboard_scalars(frame).items():
            self.writer.add_scalar(k, v, step)
        for k, values in eigenvalue_histograms(frame).items():
            self.writer.add_histogram(k, values, step)
        self.writer.flush()

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from capscale.probe.dashboard import is_monitor_key

        for k, v in scalars.items():
            if is_monitor_key(k) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


class WandbSink(Sink):
    """Dashboard scalars and eigenvalue histograms (``wandb.Histogram``) to Weights & Biases,
    on their own ``capscale/step`` axis: the measured step.

    Uses ``run`` if given, else the active ``wandb.run``, else ``wandb.init(**init_kwargs)``
    (then finished on close). Works with ``WANDB_MODE=offline``.
    """

    STEP_KEY = "capscale/step"

    def __init__(self, run=None, **init_kwargs):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("WandbSink needs the wandb package: pip install wandb") from exc
        self._owned = False
        if run is None:
            run = wandb.run
        if run is None:
            run, self._owned = wandb.init(**init_kwargs), True
        self.run = run
        # Our own step axis: the user's wandb.log calls keep theirs.
        self.run.define_metric(self.STEP_KEY)
        self.run.define_metric("capscale/*", step_metric=self.STEP_KEY)

    def write_spectra(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        import wandb

        from capscale.probe.dashboard import dashboard_scalars, eigenvalue_histograms, frame_step

        data: dict[str, Any] = dashboard_scalars(frame)
        data.update({k: wandb.Histogram(v) for k, v in eigenvalue_histograms(frame).items()})
        self.run.log({**data, self.STEP_KEY: frame_step(frame)})

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from capscale.probe.dashboard import is_monitor_key

        data = {k: v for k, v in scalars.items() if is_monitor_key(k) and math.isfinite(v)}
        if data:
            self.run.log({**data, self.STEP_KEY: step})

    def close(self) -> None:
        if self._owned:
            self.run.finish()


class ScalarBuffer(Sink):
    """Holds scalar summaries until ``pop()``: how framework callbacks hand them to their loggers."""

    def __init__(self):
        self._items: list[tuple[int, dict[str, float]]] = []

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._items.append((step, dict(scalars)))

    def pop(self) -> list[tuple[int, dict[str, float]]]:
        items, self._items = self._items, []
        return items


class ConsoleSink(Sink):
    """One line per measurement: mean ranks per site and bucket."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        parts = []
        for key, v in scalars.items():
            name = key.split("/", 1)[1] if "/" in key else key
            parts.append(f"{name}={v:.4g}")
        if parts:
            print(f"[capscale] step {step}: " + " ".join(parts), file=self.stream or sys.stdout, flush=True)
