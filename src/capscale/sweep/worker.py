"""One sweep run in its own process: ``python -m capscale.sweep.worker RUN_DIR [--nproc N]``.

Reads ``RUN_DIR/request.json`` (the run's config as the sweep planned it) and holds
an exclusive lock on the run directory while training, so a restarted or second
sweep can never have two processes writing one run. A worker that finds the lock
held refuses before it writes anything in the directory (exit code ``LOCKED_EXIT``);
the holder's status, log and lock file stay as they were. Once it holds the lock,
its output (stdout and stderr, tracebacks included) is appended to ``worker.log``.
With ``--nproc N > 1`` the lock holder launches the run under torchrun on N local
processes (one per visible GPU) and waits for it. The worker dies with its parent.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from capscale.rundir import LOCK_FILE, LOCK_HELD_ENV, RunDir, RunLockedError, RunStatus

REQUEST = "request.json"
LOCK = LOCK_FILE
LOG = "worker.log"
LOCK_TRIES = 20  # × 50 ms
LOCKED_EXIT = 75  # EX_TEMPFAIL: another process trains this run; this one wrote nothing
BUSY = "busy"  # a sweep's result for a run another process holds (never written to status.json)
# Set by the lock holder for the torchrun ranks it starts: they train under its lock.
HELD_ENV = LOCK_HELD_ENV


class RunLocked(RuntimeError):
    """Another process holds the run's lock; nothing in the run directory was changed."""


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def is_locked(run_dir: str | Path) -> bool:
    """Whether a worker holds ``run_dir`` now (a status of "running" without it means interrupted)."""
    return RunDir(run_dir).lock_holder() is not None


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s exclusive lock (``RunDir.lock``, which ``train`` re-enters), or raise
    ``RunLocked`` naming the holder; a refused process changes nothing in the directory."""
    stack = contextlib.ExitStack()
    try:
        # ``is_locked`` (sweep --status) holds a shared lock for a moment: wait that out,
        # but never for a run that another worker is training.
        stack.enter_context(RunDir(run_dir).lock(wait=LOCK_TRIES * 0.05))
    except RunLockedError as exc:
        raise RunLocked(f"{exc}; left untouched") from None
    with stack:
        yield


def _check_request(run_dir: Path) -> None:
    if not (run_dir / REQUEST).is_file():  # checked before torch is loaded
        raise FileNotFoundError(f"{str(run_dir)!r} has no {REQUEST}: not a run directory planned by a sweep")


def _train(run_dir: Path, threads: int | None, log) -> dict:
    import torch

    from capscale.train.config import RunConfig
    from capscale.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(json.loads((run_dir / REQUEST).read_text()))
    return train(cfg, run_dir, log=log)


def torchrun_command(run_dir: str | Path, nproc: int) -> list[str]:
    """The command that trains ``run_dir`` data-parallel on ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the ``torchrun`` script runs, without relying on PATH
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "capscale.sweep.worker",
        str(run_dir),
    ]


def _train_torchrun(run_dir: Path, nproc: int, threads: int | None, stdout=None) -> dict:
    env = {**os.environ, HELD_ENV: str(run_dir.resolve())}
    if threads:
        per_rank = str(max(1, threads // nproc))
        env.update(CAPSCALE_THREADS=per_rank, OMP_NUM_THREADS=per_rank)
    code = subprocess.call(
        torchrun_command(run_dir, nproc),
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout else None,
        preexec_fn=die_with_parent,  # torchrun's own ranks die with it in turn
    )
    return settle_status(run_dir, f"torchrun exited with code {code} before the run finished")


def settle_status(run_dir: Path, reason: str) -> dict:
    """The run's final status; one still marked running is failed (called under the lock)."""
    run = RunDir(run_dir)
    st = run.read_status()
    if st is None or st["status"] == RunStatus.RUNNING:
        step = st["step"] if st else 0
        run.write_status(RunStatus.FAILED, step, reason)
        return {"status": str(RunStatus.FAILED), "step": step, "reason": reason}
    return st


def run_one(run_dir: str | Path, threads: int | None = None, log=lambda _m: None) -> dict:
    """Train (or resume) the run in ``run_dir`` in this process, under its lock; returns
    its final status. Raises ``RunLocked`` (having written nothing) if another process holds it."""
    run_dir = Path(run_dir)
    _check_request(run_dir)
    with run_lock(run_dir):
        return _train(run_dir, threads, log)


def run_job(run_dir: str | Path, nproc: int = 1) -> dict:
    """A submitit job: ``run_one`` (or torchrun on ``nproc`` processes) with its log appended
    to ``worker.log``. A run another process holds gives status ``BUSY`` and is not touched."""
    run_dir = Path(run_dir)
    _check_request(run_dir)
    try:
        with run_lock(run_dir), open(run_dir / LOG, "a", buffering=1) as out:
            out.write(_banner(nproc))
            if nproc > 1:
                status = _train_torchrun(run_dir, nproc, None, stdout=out)
            else:
                try:
                    status = _train(run_dir, None, lambda m: out.write(m + "\n"))
                except Exception as exc:
                    out.write(traceback.format_exc())
                    status = settle_status(run_dir, f"{type(exc).__name__}: {exc}")
            out.write(_ending(status) + "\n")
            return status
    except RunLocked as exc:
        return {"status": BUSY, "step": None, "reason": str(exc)}


def _banner(nproc: int) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f", CUDA_VISIBLE_DEVICES={gpus}" if gpus is not None else ""
    ranks = f", torchrun x{nproc}" if nproc > 1 else ""
    return f"=== worker pid {os.getpid()} on {socket.gethostname()} at {now}{where}{ranks}\n"


def _ending(status: dict) -> str:
    reason = f" ({status['reason']})" if status.get("reason") else ""
    return f"=== {status['status']} at step {status['step']}{reason}"


def _redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (and its children's) to the end of ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capscale.sweep.worker", usage="%(prog)s RUN_DIR [--nproc N]", add_help=False
    )
    parser.add_argument("run_dir")
    parser.add_argument("--nproc", type=int, default=1)
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # argparse has printed the usage and the error
        return 2
    die_with_parent()
    run_dir = Path(args.run_dir)
    threads = int(os.environ.get("CAPSCALE_THREADS", "0")) or None
    try:
        _check_request(run_dir)
    except FileNotFoundError as exc:
        print(f"capscale worker: {exc}", file=sys.stderr)
        return 2
    held = os.environ.get(HELD_ENV)
    if held is not None:  # a torchrun rank: the process that launched torchrun holds the lock
        if held != str(run_dir.resolve()) or not is_locked(run_dir):
            print(f"capscale worker: {run_dir} is not held by the launching worker", file=sys.stderr)
            return 2
        return 0 if RunStatus(_train(run_dir, threads, print)["status"]).finished else 1
    try:
        with run_lock(run_dir):
            _redirect_output(run_dir / LOG)  # appended: a resumed run keeps its earlier output
            print(_banner(args.nproc), end="", flush=True)
            if args.nproc > 1:
                status = _train_torchrun(run_dir, args.nproc, threads)
            else:
                try:
                    status = _train(run_dir, threads, lambda m: print(m, flush=True))
                except Exception as exc:  # the traceback goes to worker.log, the reason to status.json
                    traceback.print_exc()
                    status = settle_status(run_dir, f"{type(exc).__name__}: {exc}")
        print(_ending(status), flush=True)
    except RunLocked as exc:
        print(f"capscale worker: {exc}", file=sys.stderr)
        return LOCKED_EXIT
    return 0 if RunStatus(status["status"]).finished else 1


def is_finished(status: dict | None) -> bool:
    """Whether a run's ``status.json`` content (None: not started) marks it finished."""
    return bool(status) and RunStatus(status["status"]).finished


if __name__ == "__main__":
    raise SystemExit(main())
