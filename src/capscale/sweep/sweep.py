"""Plan and run a sweep directory: ``SWEEP/sweep.json`` + ``SWEEP/runs/<name>/``."""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable
from pathlib import Path

from capscale.rundir import RunDir, RunStatus, atomic_write_json
from capscale.sweep.executors import RunResult, run_local, run_submitit, write_request
from capscale.sweep.spec import SweepSpec, _expand
from capscale.sweep.worker import is_finished, is_locked

SPEC_FILE = "sweep.json"


def plan(spec: SweepSpec, out: str | Path) -> dict[str, Path]:
    """Write the sweep spec and one request per run (idempotent); returns run dirs by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_FILE
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if old != json.loads(json.dumps(spec.to_dict())):
            raise ValueError(f"{out} holds a different sweep ({old.get('name')!r}); use another --out")
    else:
        atomic_write_json(spec_path, spec.to_dict())
    runs = {}
    for name, cfg in spec.runs().items():
        run_dir = out / "runs" / name
        write_request(run_dir, json.loads(json.dumps(cfg.to_dict())))
        runs[name] = run_dir
    return runs


def run_order(spec: SweepSpec, names) -> list[str]:
    """``names`` in the order that makes a partial sweep most useful: seed-major, then the
    grid before the extra arms, then optimizer by optimizer (each one's whole width series,
    which a β fit needs), widths ascending."""
    rank: dict[str, tuple] = {}
    labels: dict[str, int] = {}
    for arm, axes in enumerate([spec.axes] + [e.get("axes", {}) for e in spec.extra]):
        for name, cfg in _expand(spec, axes):
            lab = labels.setdefault(cfg.label, len(labels))
            rank.setdefault(name, (cfg.train.seed, arm, lab, cfg.model_config().ffn_dim))
    return sorted(names, key=rank.__getitem__)


def pending_runs(spec: SweepSpec, runs: dict[str, Path]) -> dict[str, Path]:
    """The unfinished runs of ``runs``, in ``run_order``."""
    pending = {}
    for name in run_order(spec, runs):
        if not is_finished(RunDir(runs[name]).read_status()):
            pending[name] = runs[name]
    return pending


def select_runs(runs: dict[str, Path], only: list[str] | None) -> dict[str, Path]:
    """The runs whose names match any of the shell patterns ``only`` (all when None), order kept.

    A pattern that matches no run is an error: a typo would otherwise run nothing, silently."""
    if not only:
        return runs
    for pattern in only:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in runs):
            raise ValueError(
                f"--only {pattern!r} matches none of the sweep's {len(runs)} runs "
                f"(names look like {next(iter(runs))!r})"
            )
    return {n: d for n, d in runs.items() if any(fnmatch.fnmatchcase(n, p) for p in only)}


def sweep_status(spec: SweepSpec, out: str | Path) -> list[dict]:
    """Each run of ``spec`` under ``out``, in the order a resumed sweep takes them: name, status,
    step and reason. Status is the run's own, except ``not started`` (no status file yet) and
    ``interrupted`` (says running, but no worker holds its lock: it resumes from its last
    checkpoint; a lock taken on another node reaches here only where the shared file system
    passes flock locks between nodes, as NFSv4 does). Reads only; writes nothing."""
    out = Path(out)
    if not (out / SPEC_FILE).exists():
        raise FileNotFoundError(f"{out} holds no sweep ({SPEC_FILE} missing)")
    runs = {name: out / "runs" / name for name in spec.runs()}
    states = {name: RunDir(run_dir).read_status() for name, run_dir in runs.items()}  # each read once
    finished = [n for n in runs if is_finished(states[n])]
    done = set(finished)
    rows = []
    for name in finished + [n for n in run_order(spec, runs) if n not in done]:
        st = states[name]
        status = st["status"] if st else "not started"
        if status == RunStatus.RUNNING and not is_locked(runs[name]):
            status = "interrupted"
        rows.append(
            {
                "name": name,
                "status": status,
                "step": st["step"] if st else 0,
                "reason": st.get("reason") if st else None,
            }
        )
    return rows


def _prepare_data(spec: SweepSpec, log: Callable[[str], None]) -> None:
    """Build tokenizer and token caches once, before workers race to build them."""
    from capscale.train.data import load_data

    seen = set()
    for cfg in spec.runs().values():
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            load_data(cfg.data, log=log)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    workers: int | None = None,
    executor: str = "local",
    slurm: dict | None = None,
    only: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Run every unfinished run of ``spec`` under ``out`` (those matching ``only``, if given);
    finished runs are skipped."""
    if executor not in ("local", "slurm", "submitit-local"):
        raise ValueError(f"executor must be local or slurm, got {executor!r}")
    planned = plan(spec, out)
    runs = select_runs(planned, only)
    pending = pending_runs(spec, runs)
    chosen = f" ({len(runs)} chosen by --only)" if only else ""
    log(
        f"sweep {spec.name}: {len(planned)} runs{chosen}, {len(runs) - len(pending)} already finished, "
        f"{len(pending)} to run -> {Path(out)}"
    )
    if not pending:
        return []
    _prepare_data(spec, log)
    t0, done = time.perf_counter(), [0]

    def on_event(name: str, res: RunResult | None) -> None:
        if res is None:
            log(f"  start  {name}")
            return
        done[0] += 1
        extra = f" ({res.reason})" if res.status != RunStatus.DONE and res.reason else ""
        log(
            f"  {res.status:<8} {name} in {res.seconds:.0f}s{extra}  [{done[0]}/{len(pending)}, "
            f"{time.perf_counter() - t0:.0f}s elapsed]"
        )

    if executor == "local":
        results = run_local(pending, workers=workers, on_event=on_event)
    else:
        results = run_submitit(
            pending, Path(out) / "submitit", local=executor == "submitit-local", slurm=slurm, on_event=on_event
        )
    bad = [r for r in results if r.status != RunStatus.DONE]
    log(
        f"sweep {spec.name}: {len(results) - len(bad)} done, "
        f"{sum(r.status == RunStatus.DIVERGED for r in results)} diverged, "
        f"{sum(r.status == RunStatus.FAILED for r in results)} failed "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    return results
