"""One sweep run in its own process: ``python -m capscale.sweep.worker RUN_DIR``.

Reads ``RUN_DIR/request.json`` (the run's config as the sweep planned it), holds
an exclusive lock on the run directory while training (so a restarted sweep can
never have two processes writing one run), and dies with its parent.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import sys
from pathlib import Path

from capscale.rundir import LOCK_FILE, RunDir, RunStatus

REQUEST = "request.json"
LOCK = LOCK_FILE
LOCK_TRIES = 20  # × 50 ms


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the sweep that started it dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def is_locked(run_dir: str | Path) -> bool:
    """Whether a worker holds ``run_dir`` now (a status of "running" without it means interrupted)."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def run_one(run_dir: str | Path, threads: int | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``; returns its final status."""
    run_dir = Path(run_dir)
    if not (run_dir / REQUEST).is_file():  # checked before torch is loaded
        raise FileNotFoundError(f"{str(run_dir)!r} has no {REQUEST}: not a run directory planned by a sweep")
    import torch

    from capscale.train.config import RunConfig
    from capscale.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(json.loads((run_dir / REQUEST).read_text()))
    # The run directory's lock (``train`` takes it too, re-entrantly): it waits out the
    # momentary shared lock of ``is_locked`` (sweep --status), never a run another worker trains.
    with RunDir(run_dir).lock(wait=LOCK_TRIES * 0.05):
        return train(cfg, run_dir, log=lambda _m: None)


FINISHED = tuple(s.value for s in RunStatus if s.finished)  # never run again; any other status is retried


def is_finished(status: dict | None) -> bool:
    """Whether a run's ``status.json`` content (None: not started) marks it finished."""
    return bool(status) and RunStatus(status["status"]).finished


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m capscale.sweep.worker RUN_DIR", file=sys.stderr)
        return 2
    die_with_parent()
    run_dir = sys.argv[1]
    threads = int(os.environ.get("CAPSCALE_THREADS", "0")) or None
    status = run_one(run_dir, threads)
    return 0 if is_finished(status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
