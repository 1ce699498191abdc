"""Run a sweep's runs: locally in N worker processes, or on SLURM via submitit.

Both are resumable: each run resumes from its own checkpoint and a finished run is
skipped, so starting a killed sweep again ends with the same results as an
uninterrupted one. Failed and diverged runs are recorded; the sweep goes on. A run
that another process is training (a second sweep on the same directory) is reported
as busy and left untouched. Locally, each concurrent run gets its own GPU(s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capscale.rundir import RunDir, RunStatus
from capscale.sweep.worker import BUSY, LOCKED_EXIT, LOG, REQUEST, RunLocked, run_job, run_lock, settle_status
from capscale.train.config import run_identity


@dataclass
class RunResult:
    name: str
    status: str  # a RunStatus value, or BUSY: another process holds the run (left untouched)
    step: int | None
    reason: str | None
    seconds: float


def default_workers() -> int:
    """Two cores per run fits small presets best on CPU; at least one worker."""
    return max(1, (os.cpu_count() or 1) // 2)


# The worker's command line (tests put a recorder in its place).
WORKER = [sys.executable, "-m", "capscale.sweep.worker"]


def visible_gpus(override: str | None = None) -> list[str]:
    """The GPUs runs may use: ``override`` ("0,1,2,3"), else ``CUDA_VISIBLE_DEVICES``
    (ids or UUIDs, kept as given), else ``torch.cuda.device_count()`` devices."""
    if override is not None:
        ids = [d.strip() for d in override.split(",")]
        if not all(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"--gpus takes distinct device ids separated by commas, e.g. 0,1,2,3; got {override!r}")
        return ids
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and not d.strip().startswith("-")]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class Placement:
    """How the local executor shares the machine: ``workers`` runs at a time, each on its
    own group of GPUs (none on CPU) with ``threads`` CPU threads."""

    workers: int
    groups: list[list[str]]  # one per concurrent run; empty lists: CPU runs
    threads: int
    hide_gpus: bool = False  # --gpus-per-run 0 on a machine with GPUs: runs see none

    @property
    def gpus_per_run(self) -> int:
        return len(self.groups[0]) if self.groups else 0


def place(workers: int | None = None, gpus_per_run: int | None = None, gpus: list[str] | None = None) -> Placement:
    """Split the visible GPUs ``gpus`` among concurrent runs, ``gpus_per_run`` each (default:
    1 where there are GPUs, else 0); ``workers`` defaults to as many runs as fit. Bad
    combinations are refused here, before the sweep writes anything."""
    gpus = visible_gpus() if gpus is None else gpus
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if gpus_per_run is None:
        gpus_per_run = 1 if gpus else 0
    if gpus_per_run < 0:
        raise ValueError(f"--gpus-per-run must be 0 (CPU) or more, got {gpus_per_run}")
    cores = os.cpu_count() or 1
    if gpus_per_run == 0:
        workers = workers or default_workers()
        return Placement(workers, [], max(1, cores // workers), hide_gpus=bool(gpus))
    if len(gpus) < gpus_per_run:
        raise ValueError(
            f"--gpus-per-run {gpus_per_run} needs {gpus_per_run} GPUs; {len(gpus)} visible"
            + (f" ({','.join(gpus)})" if gpus else "")
            + " (use --gpus-per-run 0 to train on CPU)"
        )
    slots = len(gpus) // gpus_per_run
    workers = workers or slots
    if workers > slots:
        raise ValueError(
            f"--workers {workers} with --gpus-per-run {gpus_per_run} needs {workers * gpus_per_run} GPUs; "
            f"{len(gpus)} visible ({','.join(gpus)})"
        )
    groups = [gpus[i * gpus_per_run : (i + 1) * gpus_per_run] for i in range(workers)]
    return Placement(workers, groups, max(1, cores // workers))


def _tail(text: str, default: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else default


def _result(name: str, run_dir: Path, seconds: float, said: str = "", code: int | None = None) -> RunResult:
    """What became of a run whose worker ended; ``said``: what it printed before it held the run."""
    if code == LOCKED_EXIT:  # refused: the run and all its files belong to another process
        return RunResult(name, BUSY, None, _tail(said, "being trained by another process"), seconds)
    st = RunDir(run_dir).read_status() or {}
    if st.get("status") in (None, RunStatus.RUNNING):
        # The worker died without saying how (killed, out of memory): mark it failed, but only
        # under the run's lock, which is free again unless another process took the run since.
        log = run_dir / LOG
        last = _tail(said, "") or _tail(log.read_text(errors="replace") if log.exists() else "", "")
        reason = f"worker exited{f' with code {code}' if code is not None else ''} before the run finished"
        reason += f"; its last words: {last}" if last else ""
        try:
            with run_lock(run_dir):
                st = settle_status(run_dir, reason)
        except RunLocked as exc:
            return RunResult(name, BUSY, st.get("step"), str(exc), seconds)
    return RunResult(name, st["status"], st.get("step"), st.get("reason"), seconds)


Event = Callable[[str, "RunResult | None"], None]


def run_local(
    runs: dict[str, Path],
    *,
    workers: int | None = None,
    placement: Placement | None = None,
    on_event: Event = lambda *_: None,
    tick: Callable[[], None] = lambda: None,
) -> list[RunResult]:
    """Run each pending run dir in a worker subprocess, ``placement.workers`` at a time, each
    on its own GPUs (``CUDA_VISIBLE_DEVICES``); a run on several GPUs runs under torchrun."""
    placement = placement or place(workers)
    queue = list(runs.items())
    free = list(range(placement.workers))  # slot i owns placement.groups[i]
    active: dict[str, tuple[subprocess.Popen, Path, float, object, int]] = {}
    results: list[RunResult] = []
    while queue or active:
        while queue and free:
            name, run_dir = queue.pop(0)
            slot = free.pop(0)
            env = {
                **os.environ,
                "CAPSCALE_THREADS": str(placement.threads),
                "OMP_NUM_THREADS": str(placement.threads),
            }
            argv = [*WORKER, str(run_dir)]
            if placement.groups:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(placement.groups[slot])
                if placement.gpus_per_run > 1:
                    argv += ["--nproc", str(placement.gpus_per_run)]
            elif placement.hide_gpus:
                env["CUDA_VISIBLE_DEVICES"] = ""
            # Until the worker holds its run it may only speak here: the run's own worker.log
            # belongs to whoever holds the run (another sweep, perhaps).
            said = tempfile.TemporaryFile()
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=said, stderr=subprocess.STDOUT)
            active[name] = (proc, run_dir, time.perf_counter(), said, slot)
            on_event(name, None)
        time.sleep(0.2)
        tick()
        for name in [n for n, (p, *_rest) in active.items() if p.poll() is not None]:
            proc, run_dir, t0, said, slot = active.pop(name)
            free.append(slot)
            said.seek(0)
            text = said.read().decode(errors="replace")
            said.close()
            res = _result(name, run_dir, time.perf_counter() - t0, text, proc.returncode)
            results.append(res)
            on_event(name, res)
    return results


def submitit_parameters(slurm: dict | None, nproc: int = 0, *, local: bool = False) -> dict:
    """submitit ``AutoExecutor`` parameters for a sweep's ``[slurm]`` table (checked by
    ``spec.check_slurm``) and ``nproc`` GPUs per run."""
    params: dict = {"timeout_min": 60 * 24}
    if local:
        return params
    for key, value in (slurm or {}).items():
        # partition, account, time are SLURM's own; slurm_time wins over timeout_min there
        params[f"slurm_{key}" if key in ("partition", "account", "time") else key] = value
    if nproc and "gpus_per_node" not in params:
        params["gpus_per_node"] = nproc
    return params


def check_submitit(*, local: bool = False):
    """submitit, where it can submit: refused with one line (before a sweep writes anything)
    when it is not installed or, for SLURM, when this machine has no ``srun``."""
    try:
        import submitit
    except ImportError:
        raise ValueError("--executor slurm needs submitit: pip install 'capscale[slurm]'") from None
    if not local and shutil.which("srun") is None:
        raise ValueError("--executor slurm: no SLURM on this machine (srun is not on PATH)")
    return submitit


def run_submitit(
    runs: dict[str, Path],
    folder: Path,
    *,
    local: bool = False,
    slurm: dict | None = None,
    nproc: int = 1,
    on_event: Event = lambda *_: None,
    tick: Callable[[], None] = lambda: None,
) -> list[RunResult]:
    """One submitit job per run: SLURM (``slurm``: the sweep's ``[slurm]`` table) or submitit's
    local executor; a job on ``nproc`` > 1 GPUs runs its run under torchrun."""
    submitit = check_submitit(local=local)
    executor = submitit.LocalExecutor(folder=folder) if local else submitit.AutoExecutor(folder=folder, cluster="slurm")
    try:
        executor.update_parameters(**submitit_parameters(slurm, nproc, local=local))
    except NameError as exc:  # submitit's word for an unknown slurm_* option
        raise ValueError(f"[slurm] table: {str(exc).splitlines()[0]}") from None
    jobs = {}
    for name, run_dir in runs.items():
        jobs[name] = (executor.submit(run_job, str(run_dir), nproc), run_dir, time.perf_counter())
        on_event(name, None)
    results = []
    while jobs:
        for name in [n for n, (job, *_rest) in jobs.items() if job.done()]:
            job, run_dir, t0 = jobs.pop(name)
            err, code = "", None
            try:
                if job.result().get("status") == BUSY:
                    err, code = job.result()["reason"], LOCKED_EXIT
            except Exception as exc:  # the run's own status.json says what happened
                err = str(exc)
            res = _result(name, run_dir, time.perf_counter() - t0, err, code)
            results.append(res)
            on_event(name, res)
        if jobs:
            time.sleep(0.5)
            tick()
    return results


def write_request(run_dir: Path, cfg_dict: dict) -> None:
    from capscale.rundir import atomic_write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / REQUEST
    if path.exists():
        old = json.loads(path.read_text())
        if run_identity(old) != run_identity(cfg_dict):
            raise ValueError(f"{run_dir} was planned with a different config; use a new sweep directory")
        return
    atomic_write_json(path, cfg_dict)
