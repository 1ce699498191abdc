"""The run directory: the contract between train, sweep, analysis and users' own loops.

Torch-free, so every layer (analysis and report included) reads run directories
through this one module, by one rule per file; the format is documented in
``docs/run-format.md``.

``config.json`` · ``metrics.jsonl`` · ``spectra.parquet/`` · ``status.json`` ·
``checkpoints/`` · ``.lock``. Whole files are written atomically (temp file +
rename); metrics and spectra are append-only: on resume they are first truncated
back to the checkpoint's step, so a resumed run's files equal an uninterrupted
run's. ``spectra.parquet`` is a Parquet dataset (one part file per window, so a
write costs the same at window 500 as at window 5; ``pd.read_parquet`` reads it
whole); an older run's single ``spectra.parquet`` file is still read, and becomes
a dataset when appended to. One process at a time writes a run: ``RunDir.lock()``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capscale.atomic import atomic_write, atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SPECTRA_FILE = "spectra.parquet"
STATUS_FILE = "status.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
# Set by a process that holds a run's lock for the torchrun ranks it starts: they train under it.
LOCK_HELD_ENV = "CAPSCALE_RUN_LOCK_HELD"
# One part of the spectra dataset: its write sequence number, then the first and
# last step it holds. Zero-padded, so names sort in write order, as readers read them.
_PART = re.compile(r"^part-(\d+)-(\d+)-(\d+)\.parquet$")
_LEGACY = ".spectra.parquet.single"  # an old single-file spectra.parquet while it becomes a dataset


class RunDirError(ValueError):
    """A run-directory file that cannot be read as the contract says (the message names it)."""


class RunLockedError(RunDirError, RuntimeError):
    """Another live process holds the run directory (the message names its pid and host)."""


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

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def create(self) -> None:
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create run directory {self.path}: {exc.strerror}") from exc
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"run directory {self.path} is not writable")

    # one writer at a time
    @contextlib.contextmanager
    def lock(self, *, wait: float = 1.0, reentrant: bool = True) -> Iterator[RunDir]:
        """Hold the run directory exclusively while the block runs; refuse at once if another process does.

        ``fcntl.flock`` on the run directory itself and on ``.lock``, which records the
        holder (pid, host, started): the kernel releases both when the holder dies, so a
        killed run never blocks its resume, and deleting ``.lock`` under a live writer
        lets no second one in (the directory stays locked). Re-entrant within one process
        (a sweep worker holds it around ``train``, which takes it too) unless
        ``reentrant=False``: then a second holder in this process is refused too (two
        ``attach(out=SAME)`` in one notebook). ``wait`` (seconds) only outlasts a
        momentary shared lock taken by a status query. On first acquisition the temp
        files left by killed writers are removed (no writer can own them now). The lock
        file, and a directory, that the lock itself created are removed on release (the
        directory only if empty): refused input leaves no trace.
        """
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is not None:
            if not reentrant:
                raise RunLockedError(
                    f"{self.path} is already being written by this process (pid {os.getpid()}); "
                    "one writer per run directory: close() the other probe first"
                )
            held[2] += 1
            try:
                yield self
            finally:
                held[2] -= 1
            return
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {self.path}: {exc.strerror}") from exc
        made_lock_file = not self.lock_path.exists()
        dir_fd, fd = self._acquire(wait)
        _HELD[key] = [dir_fd, fd, 1]
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
            self.remove_orphaned_temp()
            yield self
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale record: an empty .lock is a free one
                if made_lock_file:  # removed while still held: ``_acquire`` re-checks the inode it locked
                    self.lock_path.unlink()
                if created and not any(self.path.iterdir()):
                    self.path.rmdir()
            os.close(fd)  # releases the flocks
            os.close(dir_fd)

    def _refuse(self) -> RunLockedError:
        holder = self.lock_holder() or {}
        who = (
            f" (pid {holder['pid']} on {holder.get('host')}, since {holder.get('started')})" if "pid" in holder else ""
        )
        return RunLockedError(
            f"{self.path} is being trained by another process{who}; one process writes a run directory at a time"
        )

    def _acquire(self, wait: float) -> tuple[int, int]:
        deadline = time.monotonic() + wait
        try:
            dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise RunDirError(f"cannot open the run directory {self.path}: {exc.strerror}") from exc
        try:
            # The directory first: a writer holds it even after its .lock file was deleted.
            while True:
                try:
                    fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._refuse() from None
                    time.sleep(0.05)
            return dir_fd, self._acquire_file(deadline)
        except BaseException:
            os.close(dir_fd)
            raise

    def _acquire_file(self, deadline: float) -> int:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise RunDirError(f"cannot create the lock file {self.lock_path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise self._refuse() from None
                time.sleep(0.05)
                continue
            # The file may have been removed (a refused first run tidying up) between open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def lock_holder(self) -> dict | None:
        """While a live process holds the lock, its record (pid, host, started; {} if it wrote none), else None."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return {} if self._dir_locked() else None  # .lock deleted under a live writer
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 4096).decode("utf-8", "replace")
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError:
                    rec = None  # being written this instant
                return rec if isinstance(rec, dict) else {}
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return {} if self._dir_locked() else None

    def _dir_locked(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def remove_orphaned_temp(self) -> list[Path]:
        """Delete the temp files of writes cut short by a kill (``.NAME.PID.HEX.tmp``); call under ``lock``."""
        removed = []
        for folder in (self.path, self.checkpoint_dir, self.spectra_path):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        if removed:
            log.info("%s: removed %d orphaned temp file(s) of interrupted writes", self.path, len(removed))
        return removed

    # config / status
    def read_config(self) -> dict | None:
        return _read_object(self.config_path) if self.config_path.exists() else None

    def write_config(self, cfg: dict) -> None:
        atomic_write_json(self.config_path, cfg)

    def read_status(self) -> dict | None:
        """``status.json`` (None before the run starts); anything but a valid status is a ``RunDirError``."""
        if not self.status_path.exists():
            return None
        st = _read_object(self.status_path)
        if st.get("status") not in STATUSES:
            raise RunDirError(f"{self.status_path}: 'status' must be one of {STATUSES}, got {st.get('status')!r}")
        step = st.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise RunDirError(f"{self.status_path}: 'step' must be a non-negative integer, got {step!r}")
        return st

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
        """The records of ``metrics.jsonl``, by the one rule: see ``read_metrics_file``."""
        return read_metrics_file(self.metrics_path)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only records with step <= last_step (resume from that checkpoint).

        A damaged line other than a torn last one is refused before anything is
        written; kept lines are kept byte for byte.
        """
        if not self.metrics_path.exists():
            return
        parsed = _parse_metrics(self.metrics_path)
        for n, (rec, _) in enumerate(parsed.records, start=1):
            step = rec.get("step", -1)
            if isinstance(step, bool) or not isinstance(step, int):
                raise RunDirError(
                    f"{self.metrics_path} record {n}: 'step' must be an integer, got {step!r:.40}; "
                    "repair or remove that line; the file was left as it was"
                )
        kept = [line for rec, line in parsed.records if rec.get("step", -1) <= last_step]
        if len(kept) == len(parsed.records) and parsed.complete:
            return
        atomic_write_bytes(self.metrics_path, "".join(line + "\n" for line in kept).encode(), fsync=True)

    # spectra: a Parquet dataset of part files
    def append_spectra(self, frame: pd.DataFrame) -> None:
        """Add ``frame`` to spectra.parquet as one new part file (atomic; earlier parts are not touched)."""
        if frame is None or frame.empty:
            return
        write_spectra_part(self.spectra_path, frame)

    def read_spectra(self, columns: list[str] | None = None) -> pd.DataFrame | None:
        """spectra.parquet (dataset or an older single file), in step order; ``columns`` to read only those."""
        return read_spectra(self.spectra_path, columns)

    def damaged_spectra_parts(self) -> list[tuple[Path, str]]:
        """The spectra parts whose Parquet footer cannot be read or that hold no rows, with why."""
        return damaged_spectra_parts(self.spectra_path)

    def truncate_spectra(self, last_step: int) -> None:
        """Keep only rows with step <= last_step: later parts are deleted, at most one part is rewritten."""
        truncate_spectra(self.spectra_path, last_step)


_HELD: dict[str, list] = {}  # this process's run locks: run directory's real path → [dir fd, lock fd, depth]


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_json_object(path: str | Path) -> dict:
    """A JSON object from ``path``; anything else (a directory included) is one ``RunDirError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"{path} is a directory, not a file")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise RunDirError(f"{path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


_read_object = read_json_object


# -- metrics.jsonl: the one reading rule -------------------------------------------


class _Metrics:
    def __init__(self, records: list[tuple[dict, str]], torn: bool, complete: bool):
        # complete: the file ends with a newline (a later append starts a line of its own)
        self.records, self.torn, self.complete = records, torn, complete


def _parse_metrics(path: Path) -> _Metrics:
    data = path.read_bytes()
    lines = data.split(b"\n")
    last = len(lines) - 1  # the text after the final newline: empty unless an append was cut short
    records: list[tuple[dict, str]] = []
    torn = False
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            rec = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = text = None
        if isinstance(rec, dict):
            records.append((rec, text))
        elif i == last:
            torn = True  # no newline after it: an append cut short (a kill); everything before it stands
        else:
            raise RunDirError(
                f"{path} line {i + 1} is damaged (not a JSON object); only a torn last line may be dropped. "
                "Repair or remove that line; the file was left as it was"
            )
    if torn:
        log.warning("%s: dropped its torn last line %d (an append cut short by a kill)", path, last + 1)
    return _Metrics(records, torn, not data or data.endswith(b"\n"))


def read_metrics_file(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` ([] if absent).

    A torn last line (no newline after it: what a kill leaves) is dropped, with a
    logged warning naming the file; a damaged line anywhere else is a
    ``RunDirError`` naming the file and line.
    """
    path = Path(path)
    return [rec for rec, _ in _parse_metrics(path).records] if path.exists() else []


# -- spectra.parquet: a dataset of part files ----------------------------------------


def arrow_table(frame: pd.DataFrame):
    """A spectra frame as an Arrow table, eigenvalues typed ``list<double>`` even when all null."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if "eigenvalues" in table.column_names:
        i = table.column_names.index("eigenvalues")
        table = table.set_column(i, "eigenvalues", table.column("eigenvalues").cast(pa.list_(pa.float64())))
    return table


def _parts(path: Path) -> list[tuple[int, int, int, Path]]:
    found = []
    if path.is_dir():
        for p in path.iterdir():
            m = _PART.match(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), p))
    return sorted(found, key=lambda t: t[:3])


def spectra_parts(path: str | Path) -> list[tuple[int, int, Path]]:
    """The part files of a spectra dataset as (first step, last step, path), in write order."""
    return [(first, last, p) for _, first, last, p in _parts(Path(path))]


def _write_part(path: Path, table, seq: int | None = None, **options) -> Path:
    """``table`` as part ``seq`` (default: after the last part), replacing a part of that number;
    ``options`` go to ``pyarrow.parquet.write_table`` (e.g. ``compression="zstd"``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if "step" in table.column_names and table.num_rows:
        mm = pc.min_max(table.column("step"))
        first, last = int(mm["min"].as_py()), int(mm["max"].as_py())
    else:
        first = last = 0
    rewrite = seq is not None
    if seq is None:  # names only, no Path objects: this listing is the one cost that grows with the run
        seq = 1 + max((int(m.group(1)) for n in os.listdir(path) if (m := _PART.match(n))), default=-1)
    target = path / f"part-{seq:08d}-{first:08d}-{last:08d}.parquet"
    atomic_write(target, lambda tmp: pq.write_table(table, tmp, **options), fsync=True)
    if rewrite:  # a part of the same number goes once its successor is in place
        for n, _, _, p in _parts(path):
            if n == seq and p != target:
                p.unlink()
    return target


def _as_dataset(path: Path) -> None:
    """Turn an older single-file spectra.parquet into a dataset (its rows become the first part)."""
    import pyarrow.parquet as pq

    legacy = path.parent / _LEGACY
    if path.is_file():
        os.replace(path, legacy)
    if legacy.is_file():  # also finishes a conversion that a kill interrupted
        path.mkdir(exist_ok=True)
        _write_part(path, pq.read_table(legacy), seq=0)
        legacy.unlink()
    path.mkdir(parents=True, exist_ok=True)


def write_spectra_part(path: str | Path, frame: pd.DataFrame, **options) -> Path:
    """Write ``frame`` as one new part of the spectra dataset at ``path``; returns the part's path.
    ``options`` go to ``pyarrow.parquet.write_table`` (e.g. ``compression="zstd"``)."""
    path = Path(path)
    _as_dataset(path)
    return _write_part(path, arrow_table(frame), **options)


def read_spectra(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame | None:
    """A spectra dataset (or older single file) as one frame, parts in step order; None if there is none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_file():
        return pq.read_table(path, columns=columns).to_pandas()
    parts = spectra_parts(path)
    if not parts:
        return None
    tables = []
    for _, _, p in parts:  # a part written by an older capscale may lack a newer column: null there
        names = set(pq.read_schema(p).names)
        tables.append(pq.read_table(p, columns=None if columns is None else [c for c in columns if c in names]))
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def damaged_spectra_parts(path: str | Path) -> list[tuple[Path, str]]:
    """Each part (or the single file) of a spectra dataset whose footer is unreadable or whose
    row count is 0, with the reason; reads footers only, not rows."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = [path] if path.is_file() else [p for _, _, p in spectra_parts(path)]
    damaged = []
    for p in files:
        try:
            rows = pq.read_metadata(p).num_rows
        except (OSError, ValueError) as exc:  # ArrowInvalid: "Parquet magic bytes not found", truncated
            damaged.append((p, " ".join(str(exc).split()) or type(exc).__name__))
            continue
        if rows < 1:
            damaged.append((p, "its footer counts 0 rows"))
    return damaged


def spectra_columns(path: str | Path) -> list[str]:
    """The column names of a spectra dataset (or file), without reading its rows."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_file():
        return list(pq.read_schema(path).names)
    names: list[str] = []
    for _, _, p in spectra_parts(path):
        names += [n for n in pq.read_schema(p).names if n not in names]
    return names


def truncate_spectra(path: str | Path, last_step: int) -> None:
    """Keep rows with step <= last_step: parts past it are deleted, the one straddling it rewritten."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists() and not (path.parent / _LEGACY).exists():
        return
    _as_dataset(path)
    for seq, first, last, p in reversed(_parts(path)):
        if first > last_step:
            p.unlink()
        elif last > last_step:  # written before the old one goes: a kill loses nothing
            table = pq.read_table(p)
            _write_part(path, table.filter(pc.less_equal(table.column("step"), last_step)), seq=seq)
