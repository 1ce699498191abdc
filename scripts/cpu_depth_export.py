"""Export the finished runs of a sweep into a committed results directory, replacing its runs.

    python scripts/cpu_depth_export.py runs/cpu-depth docs/results/cpu-depth
    python scripts/cpu_depth_export.py runs/cpu-depth-rep docs/results/cpu-depth/rep
    python scripts/cpu_depth_export.py runs/cpu-depth-lr docs/results/cpu-depth/lr

Like ``scripts/export_study.py`` (``sweep.json`` and per run ``config.json``,
``metrics.jsonl``, ``status.json``, ``spectra.parquet`` without eigenvalue lists), but only
the runs that have ended (status ``done``, ``diverged`` or ``failed``: the pre-registration
lists a run that diverged or failed, so the export must hold it too), and into a directory that may already hold an earlier
export and other files: its ``sweep.json`` and ``runs/`` are replaced, everything else is
left. A study in progress is committed this way run by run; copying the export back
(``cp -r docs/results/cpu-depth/. runs/cpu-depth``) and resuming the sweep skips the
exported runs and trains the rest from the start (checkpoints are not exported).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_study import export_study  # noqa: E402

ENDED = ("done", "diverged", "failed")


def finished(sweep: Path) -> list[Path]:
    """The runs of ``sweep`` that have ended (never one still running, interrupted or not started)."""
    out = []
    for run in sorted((sweep / "runs").iterdir()):
        try:
            if json.loads((run / "status.json").read_text()).get("status") in ENDED:
                out.append(run)
        except (OSError, ValueError):
            continue
    return out


def export_finished(sweep: Path, dest: Path, max_mb: float = 20.0) -> tuple[int, int]:
    """Export the ended runs of ``sweep`` into ``dest``; returns (runs exported, bytes)."""
    runs = finished(sweep)
    if not runs:
        raise ValueError(f"{sweep} has no finished run")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        view = Path(tmp) / "view"  # a sweep directory of links to the finished runs only
        (view / "runs").mkdir(parents=True)
        shutil.copy2(sweep / "sweep.json", view / "sweep.json")
        for run in runs:
            (view / "runs" / run.name).symlink_to(run.resolve(), target_is_directory=True)
        size = export_study(view, Path(tmp) / "export", max_mb=max_mb)
        if (dest / "runs").exists():
            shutil.rmtree(dest / "runs")
        shutil.move(str(Path(tmp) / "export" / "runs"), dest / "runs")
        shutil.copy2(Path(tmp) / "export" / "sweep.json", dest / "sweep.json")
    return len(runs), size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--max-mb", type=float, default=20.0)
    args = parser.parse_args(argv)
    try:
        n, size = export_finished(args.sweep, args.dest, args.max_mb)
    except (ValueError, OSError) as exc:
        print(f"cpu_depth_export: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {n} finished run(s), {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
