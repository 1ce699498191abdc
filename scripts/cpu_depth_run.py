"""Run (or resume) the ``cpu-depth`` study in its pre-registered order, one run at a time.

    python scripts/cpu_depth_run.py lr   [--out runs] [--threads 1]   # the 12 learning-rate runs
    python scripts/cpu_depth_run.py grid [--out runs] [--threads 1]   # the grid and the repetition arm
    python scripts/cpu_depth_run.py grid --parallel 2                 # two runs at once, one per core

``grid`` runs seed 0 of the grid (``cpu-depth``: every cell, depth 6 first), then seed 0
of the repetition arm (``cpu-depth-rep``), then seeds 1 and 2 the same way, then seeds 3
and 4 of the grid (docs/preregistration/cpu-depth.md, "Order of runs"). Each preset is
its own sweep directory under ``--out`` (``OUT/cpu-depth``, ...), planned as
``capscale sweep`` plans it, so ``capscale sweep --preset cpu-depth --out OUT/cpu-depth
--status`` shows it and either command resumes it. Each run trains in a worker process
with ``--threads`` threads (``capscale sweep --workers 1`` would give it every core).
Finished runs are skipped; an interrupted one resumes from its last checkpoint.
``--parallel N`` runs N at once, each free slot taking the next run of the same ordered
queue (a run's result does not depend on which slot ran it; each is one process under the
run's lock).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from capscale.sweep.spec import load_spec
from capscale.sweep.sweep import _prepare_data, pending_runs, plan, select_runs

STAGES = {
    "lr": [("cpu-depth-lr", None)],
    "grid": [
        ("cpu-depth", 0),
        ("cpu-depth-rep", 0),
        ("cpu-depth", 1),
        ("cpu-depth-rep", 1),
        ("cpu-depth", 2),
        ("cpu-depth-rep", 2),
        ("cpu-depth", 3),
        ("cpu-depth", 4),
    ],
}


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} {msg}", flush=True)


def queue(stage: str, out: Path) -> list[tuple[str, str, Path]]:
    """The stage's unfinished runs in the pre-registered order, as ``(preset, name, run_dir)``.

    Each preset is planned as ``capscale sweep`` plans it (``OUT/<preset>``) and its data is
    prepared before any of its runs starts."""
    items = []
    for preset, seed in STAGES[stage]:
        spec = load_spec(preset)
        runs = plan(spec, out / preset)
        chosen = select_runs(runs, None if seed is None else [f"*_s{seed}"])
        pending = pending_runs(spec, chosen)
        label = f"{preset}{'' if seed is None else f' seed {seed}'}"
        say(f"{label}: {len(chosen) - len(pending)} finished, {len(pending)} to run")
        if pending:
            _prepare_data(spec, say)
        items += [(preset, name, run_dir) for name, run_dir in pending.items()]
    return items


def run_queue(items: list, parallel: int, run_one) -> int:
    """Run ``items`` in their order, ``parallel`` at a time (each free slot takes the next one);
    returns how many did not finish (``run_one`` returned a non-zero exit code)."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:  # FIFO: slots take items in order
        return sum(rc != 0 for rc in pool.map(lambda item: run_one(*item), items))


def worker(threads: int):
    """One run in its own worker process with ``threads`` threads; returns its exit code."""
    env = {**os.environ, "CAPSCALE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}

    def run_one(preset: str, name: str, run_dir: Path) -> int:
        t0 = time.perf_counter()
        say(f"start {preset}/{name}")
        cmd = [sys.executable, "-m", "capscale.sweep.worker", str(run_dir)]
        rc = subprocess.run(cmd, env=env, check=False).returncode
        say(f"end   {preset}/{name}: exit {rc} after {time.perf_counter() - t0:.0f} s")
        return rc

    return run_one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent of the sweep directories")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument(
        "--parallel", type=int, default=1, help="runs at once, taken from the queue in its order (e.g. one per core)"
    )
    args = parser.parse_args(argv)
    bad = run_queue(queue(args.stage, args.out), args.parallel, worker(args.threads))
    say(f"stage {args.stage}: {'all runs finished' if not bad else f'{bad} run(s) did not finish'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
