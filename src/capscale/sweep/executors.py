"""Run a sweep's runs: locally in N worker processes, or on SLURM via submitit.

Both are resumable: each run resumes from its own checkpoint and a finished run is
skipped, so starting a killed sweep again ends with the same results as an
uninterrupted one. Failed and diverged runs are recorded; the sweep goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capscale.rundir import RunDir, RunStatus
from capscale.sweep.worker import REQUEST, run_one


@dataclass
class RunResult:
    name: str
    status: str
    step: int | None
    reason: str | None
    seconds: float


def default_workers() -> int:
    """Two cores per run fits small presets best on CPU; at least one worker."""
    return max(1, (os.cpu_count() or 1) // 2)


def _status(run_dir: Path) -> dict | None:
    return RunDir(run_dir).read_status()


def _result(name: str, run_dir: Path, seconds: float, stderr: str = "") -> RunResult:
    st = _status(run_dir) or {}
    status = st.get("status", RunStatus.FAILED.value)
    reason = st.get("reason")
    if status == RunStatus.RUNNING:  # the process ended without finishing: it failed before it could say so
        status, reason = RunStatus.FAILED.value, (stderr.strip().splitlines() or ["worker exited early"])[-1]
        RunDir(run_dir).write_status(RunStatus.FAILED, st.get("step", 0), reason)
    if not st:
        reason = (stderr.strip().splitlines() or ["worker exited before writing a status"])[-1]
        RunDir(run_dir).write_status(RunStatus.FAILED, 0, reason)
    return RunResult(name, status, st.get("step"), reason, seconds)


def run_local(
    runs: dict[str, Path],
    *,
    workers: int | None = None,
    on_event: Callable[[str, RunResult | None], None] = lambda *_: None,
) -> list[RunResult]:
    """Run each pending run dir in a subprocess, ``workers`` at a time."""
    workers = workers or default_workers()
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "CAPSCALE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    queue = list(runs.items())
    active: dict[str, tuple[subprocess.Popen, Path, float, object]] = {}
    results: list[RunResult] = []
    while queue or active:
        while queue and len(active) < workers:
            name, run_dir = queue.pop(0)
            err = open(run_dir / "worker.log", "w")
            proc = subprocess.Popen(
                [sys.executable, "-m", "capscale.sweep.worker", str(run_dir)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            active[name] = (proc, run_dir, time.perf_counter(), err)
            on_event(name, None)
        time.sleep(0.2)
        for name in [n for n, (p, *_rest) in active.items() if p.poll() is not None]:
            proc, run_dir, t0, err = active.pop(name)
            err.close()
            res = _result(name, run_dir, time.perf_counter() - t0, (run_dir / "worker.log").read_text())
            results.append(res)
            on_event(name, res)
    return results


def run_submitit(
    runs: dict[str, Path],
    folder: Path,
    *,
    local: bool = False,
    slurm: dict | None = None,
    on_event: Callable[[str, RunResult | None], None] = lambda *_: None,
) -> list[RunResult]:
    """One submitit job per run: SLURM (``slurm`` = executor parameters) or submitit's local executor."""
    try:
        import submitit
    except ImportError:
        raise ImportError("the slurm executor needs submitit: pip install 'capscale[slurm]'") from None
    executor = submitit.LocalExecutor(folder=folder) if local else submitit.AutoExecutor(folder=folder)
    executor.update_parameters(**({"timeout_min": 60 * 24} if local else {"timeout_min": 60 * 24, **(slurm or {})}))
    jobs = {}
    for name, run_dir in runs.items():
        jobs[name] = (executor.submit(run_one, str(run_dir)), run_dir, time.perf_counter())
        on_event(name, None)
    results = []
    for name, (job, run_dir, t0) in jobs.items():
        err = ""
        try:
            job.result()
        except Exception as exc:  # the run's own status.json says what happened
            err = str(exc)
        res = _result(name, run_dir, time.perf_counter() - t0, err)
        results.append(res)
        on_event(name, res)
    return results


def write_request(run_dir: Path, cfg_dict: dict) -> None:
    from capscale.rundir import atomic_write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / REQUEST
    if path.exists():
        old = json.loads(path.read_text())
        if old != cfg_dict:
            raise ValueError(f"{run_dir} was planned with a different config; use a new sweep directory")
        return
    atomic_write_json(path, cfg_dict)
