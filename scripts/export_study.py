"""Export a sweep's results in a form small enough to commit, and that ``capscale report`` reads.

    python scripts/export_study.py runs/cpu-long docs/results/cpu-long
    capscale report docs/results/cpu-long          # rebuilds the tables from the export

The export is a sweep directory of its own: ``sweep.json`` and, per run,
``config.json``, ``metrics.jsonl``, ``status.json`` and ``spectra.parquet`` without the
eigenvalue lists (every scalar column kept), as one zstd-compressed part. Checkpoints, locks and
logs are left behind. With ``--report`` the report is built into ``OUT/report`` from
the export, so report.json sits beside the data it was computed from.
Refuses (one line, nothing written) a source that is not a sweep directory, an
existing non-empty destination, or an export over ``--max-mb``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from capscale.rundir import read_spectra, spectra_columns, write_spectra_part

RUN_FILES = ("config.json", "metrics.jsonl", "status.json")


def export_study(sweep: Path, out: Path, *, max_mb: float = 20.0) -> int:
    """Write the export of ``sweep`` to ``out``; returns its size in bytes."""
    if not (sweep / "sweep.json").is_file() or not (sweep / "runs").is_dir():
        raise ValueError(f"{sweep} is not a sweep directory (needs sweep.json and runs/)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; export into a new directory")
    runs = sorted(p for p in (sweep / "runs").iterdir() if (p / "config.json").is_file())
    if not runs:
        raise ValueError(f"{sweep}/runs holds no run directory with a config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the destination, move into place at the end: a refused or failed export leaves nothing
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / "export"
        stage.mkdir()
        shutil.copy2(sweep / "sweep.json", stage / "sweep.json")
        for run in runs:
            dest = stage / "runs" / run.name
            dest.mkdir(parents=True)
            for name in RUN_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, dest / name)
            spectra = run / "spectra.parquet"  # a dataset of part files (or an older single file)
            if spectra.exists():
                columns = [c for c in spectra_columns(spectra) if c != "eigenvalues"]
                frame = read_spectra(spectra, columns=columns)
                if frame is not None:  # one part, in the run format
                    write_spectra_part(dest / "spectra.parquet", frame, compression="zstd", compression_level=19)
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        if size > max_mb * 1e6:
            raise ValueError(f"the export of {sweep} would be {size / 1e6:.1f} MB, over --max-mb {max_mb:g}")
        if out.exists():
            out.rmdir()
        stage.rename(out)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep directory to export")
    parser.add_argument("out", type=Path, help="the new export directory, e.g. docs/results/<study>")
    parser.add_argument("--max-mb", type=float, default=20.0, help="refuse an export larger than this (MB)")
    parser.add_argument("--report", action="store_true", help="also build OUT/report from the export")
    args = parser.parse_args(argv)
    try:
        size = export_study(args.sweep, args.out, max_mb=args.max_mb)
    except (ValueError, OSError) as e:
        print(f"export_study: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {size / 1e6:.2f} MB")
    if args.report:
        from capscale.report import build_report

        files = build_report(args.out)
        print(f"{files.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
