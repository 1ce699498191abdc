"""Plan and run a sweep directory: ``SWEEP/sweep.json`` + ``SWEEP/runs/<name>/``."""

from __future__ import annotations

import fnmatch
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from capscale.rundir import RunDir, RunDirError, RunStatus, atomic_write_json, read_json_object
from capscale.sweep.executors import (
    RunResult,
    check_submitit,
    place,
    run_local,
    run_submitit,
    visible_gpus,
    write_request,
)
from capscale.sweep.progress import Progress, duration, ensure_handler, logger
from capscale.sweep.spec import SweepSpec, _expand, slurm_gpus
from capscale.sweep.worker import BUSY, REQUEST, is_finished, is_locked

SPEC_FILE = "sweep.json"


def plan(spec: SweepSpec, out: str | Path) -> dict[str, Path]:
    """Write the sweep spec and one request per run (idempotent); returns run dirs by name."""
    out = Path(out)
    _check_same_sweep(spec, out)
    configs = {name: json.loads(json.dumps(cfg.to_dict())) for name, cfg in spec.runs().items()}
    _check_requests(out, configs)  # every existing request.json, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_FILE
    if not spec_path.exists():
        atomic_write_json(spec_path, spec.to_dict())
    runs = {}
    for name, cfg in configs.items():
        run_dir = out / "runs" / name
        write_request(run_dir, cfg)
        runs[name] = run_dir
    return runs


def _check_requests(out: Path, configs: dict[str, dict]) -> None:
    """An existing ``request.json`` must be a run config (one line naming it otherwise); whether
    it is this sweep's run is ``write_request``'s check."""
    from capscale.train.config import run_identity

    for name in configs:
        path = out / "runs" / name / REQUEST
        if not path.exists():
            continue
        old = read_json_object(path)  # a RunDirError naming the file
        try:
            run_identity(old)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RunDirError(f"{path} is not a run config ({' '.join(str(exc).split())})") from None


def saved_spec(out: str | Path) -> SweepSpec:
    """The sweep that ``out`` holds, from its ``sweep.json`` (what ``plan`` wrote there)."""
    path = Path(out) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no sweep ({SPEC_FILE} missing): give --preset or --config")
    try:
        return SweepSpec.from_dict(read_json_object(path))
    except RunDirError:
        raise  # names the file already
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a sweep spec: {exc}") from None


def _check_same_sweep(spec: SweepSpec, out: Path) -> None:
    spec_path = out / SPEC_FILE
    if spec_path.exists():
        old = read_json_object(spec_path)
        if old != json.loads(json.dumps(spec.to_dict())):
            raise ValueError(f"{out} holds a different sweep ({old.get('name')!r}); use another --out")


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
    step, total (the run's steps) and reason; a run that is running or interrupted also has
    its last logged ``loss``, and a running one its ``eta_s`` (seconds left, from the recent
    throughput in its metrics.jsonl; None when unknown). Status is the run's own, except
    ``not started`` (no status file yet) and ``interrupted`` (says running, but no worker
    holds its lock: it resumes from its last checkpoint; a lock taken on another node reaches
    here only where the shared file system passes flock locks between nodes, as NFSv4
    does). Reads only; writes nothing."""
    out = Path(out)
    if not (out / SPEC_FILE).exists():
        raise FileNotFoundError(f"{out} holds no sweep ({SPEC_FILE} missing)")
    configs = spec.runs()
    runs = {name: out / "runs" / name for name in configs}
    states = {name: RunDir(run_dir).read_status() for name, run_dir in runs.items()}  # each read once
    finished = [n for n in runs if is_finished(states[n])]
    done = set(finished)
    rows = []
    for name in finished + [n for n in run_order(spec, runs) if n not in done]:
        st = states[name]
        status = st["status"] if st else "not started"
        if status == RunStatus.RUNNING and not is_locked(runs[name]):
            status = "interrupted"
        row = {
            "name": name,
            "status": str(status),
            "step": st["step"] if st else 0,
            "total": configs[name].train.steps,
            "reason": st.get("reason") if st else None,
        }
        if status in (RunStatus.RUNNING, "interrupted"):
            row.update(_live(RunDir(runs[name]), configs[name], row["step"], status == RunStatus.RUNNING))
        rows.append(row)
    return rows


def _live(run: RunDir, cfg, step: int, running: bool, recent: int = 5) -> dict:
    """Step, last loss and ETA of an unfinished run from its metrics.jsonl."""
    try:
        records = [r for r in run.read_metrics() if isinstance(r, dict) and isinstance(r.get("step"), int)]
    except (ValueError, OSError):  # unreadable metrics: the row still shows the status's step
        records = []
    out: dict = {"loss": None}
    losses = [r for r in records if isinstance(r.get("loss"), (int, float))]
    if losses:
        out["loss"] = float(losses[-1]["loss"])
    if records:
        out["step"] = max(step, records[-1]["step"])
    if running:
        rates = [r["tokens_per_s"] for r in records[-recent:] if isinstance(r.get("tokens_per_s"), (int, float))]
        rates = [r for r in rates if r > 0]
        tokens_per_step = cfg.train.batch_size * cfg.model_config().seq_len
        left = cfg.train.steps - out.get("step", step)
        out["eta_s"] = left * tokens_per_step / (sum(rates) / len(rates)) if rates else None
    return out


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
    gpus_per_run: int | None = None,
    gpus: str | list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Run every unfinished run of ``spec`` under ``out`` (those matching ``only``, if given);
    finished runs are skipped.

    Locally, ``workers`` runs at a time, each on its own ``gpus_per_run`` GPUs taken from
    ``gpus`` (default: the visible ones; "0,1,2,3" or a list); ``gpus_per_run`` and ``slurm``
    default to the spec's. ``log`` takes the event lines (default: the ``capscale.sweep``
    logger, with one live progress line in a terminal)."""
    if executor not in ("local", "slurm", "submitit-local"):
        raise ValueError(f"executor must be local or slurm, got {executor!r}")
    gpus_per_run = spec.gpus_per_run if gpus_per_run is None else gpus_per_run
    slurm = spec.slurm if slurm is None else slurm
    placement = None
    if executor == "local":  # refused here, before anything is written
        placement = place(workers, gpus_per_run, visible_gpus(gpus) if not isinstance(gpus, list) else gpus)
    nproc = 1
    if executor != "local":
        check_submitit(local=executor == "submitit-local")
        nproc = max(1, slurm_gpus(slurm, gpus_per_run)) if executor == "slurm" else 1
    if log is None:
        ensure_handler()
    say = log or logger.info
    # Validated before anything is written: a refused sweep leaves no trace.
    select_runs({name: Path(out) / "runs" / name for name in spec.runs()}, only)
    _check_same_sweep(spec, Path(out))
    planned = plan(spec, out)
    runs = select_runs(planned, only)
    pending = pending_runs(spec, runs)
    chosen = f" ({len(runs)} chosen by --only)" if only else ""
    where = ""
    if placement is not None:
        where = f"; {placement.workers} at a time" + (
            f", {placement.gpus_per_run} GPU(s) each ({' | '.join(','.join(g) for g in placement.groups)})"
            if placement.groups
            else " on CPU"
        )
    say(
        f"sweep {spec.name}: {len(planned)} runs{chosen}, {len(runs) - len(pending)} already finished, "
        f"{len(pending)} to run -> {Path(out)}{where}"
    )
    if not pending:
        return []
    _prepare_data(spec, say)
    progress = Progress(spec.name, len(pending), placement.workers if placement else len(pending), log=log)

    def on_event(name: str, res: RunResult | None) -> None:
        if res is None:
            progress.start(name)
        else:
            progress.finish(res)

    t0 = time.perf_counter()
    try:
        if executor == "local":
            results = run_local(pending, placement=placement, on_event=on_event, tick=progress.tick)
        else:
            results = run_submitit(
                pending,
                Path(out) / "submitit",
                local=executor == "submitit-local",
                slurm=slurm,
                nproc=nproc,
                on_event=on_event,
                tick=progress.tick,
            )
    finally:
        progress.close()
    count = Counter(r.status for r in results)
    busy = f", {count[BUSY]} left to the process that holds them" if count[BUSY] else ""
    say(
        f"sweep {spec.name}: {count[RunStatus.DONE]} done, {count[RunStatus.DIVERGED]} diverged, "
        f"{count[RunStatus.FAILED]} failed{busy} in {duration(time.perf_counter() - t0)}"
    )
    return results
