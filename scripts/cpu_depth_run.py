"""Run (or resume) the ``cpu-depth`` study in its pre-registered order, one run at a time.

    python scripts/cpu_depth_run.py lr   [--out runs] [--threads 1]   # the 12 learning-rate runs
    python scripts/cpu_depth_run.py grid [--out runs] [--threads 1]   # the grid and the repetition arm

``grid`` runs seed 0 of the grid (``cpu-depth``: every cell, depth 6 first), then seed 0
of the repetition arm (``cpu-depth-rep``), then seeds 1 and 2 the same way, then seeds 3
and 4 of the grid (docs/preregistration/cpu-depth.md, "Order of runs"). Each preset is
its own sweep directory under ``--out`` (``OUT/cpu-depth``, ...), planned as
``capscale sweep`` plans it, so ``capscale sweep --preset cpu-depth --out OUT/cpu-depth
--status`` shows it and either command resumes it. Each run trains in a worker process
with ``--threads`` threads (``capscale sweep --workers 1`` would give it every core).
Finished runs are skipped; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
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


def run_stage(preset: str, seed: int | None, out: Path, threads: int) -> int:
    """Run the unfinished runs of ``preset`` (of one seed, if given); returns how many did not finish."""
    spec = load_spec(preset)
    runs = plan(spec, out / preset)
    chosen = select_runs(runs, None if seed is None else [f"*_s{seed}"])
    pending = pending_runs(spec, chosen)
    say(
        f"{preset}{'' if seed is None else f' seed {seed}'}: {len(chosen) - len(pending)} finished, {len(pending)} to run"
    )
    if pending:
        _prepare_data(spec, say)
    env = {**os.environ, "CAPSCALE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    bad = 0
    for name, run_dir in pending.items():
        t0 = time.perf_counter()
        say(f"start {preset}/{name}")
        rc = subprocess.run(
            [sys.executable, "-m", "capscale.sweep.worker", str(run_dir)], env=env, check=False
        ).returncode
        say(f"end   {preset}/{name}: exit {rc} after {time.perf_counter() - t0:.0f} s")
        bad += rc != 0
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent of the sweep directories")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    args = parser.parse_args(argv)
    bad = sum(run_stage(preset, seed, args.out, args.threads) for preset, seed in STAGES[args.stage])
    say(f"stage {args.stage}: {'all runs finished' if not bad else f'{bad} run(s) did not finish'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
