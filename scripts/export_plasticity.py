"""Export a sweep together with its `capscale plasticity` continuations, small enough to commit.

    python scripts/export_plasticity.py runs/cl docs/results/cpu-long-plasticity --report
    capscale report docs/results/cpu-long-plasticity   # shows the plasticity section

The sweep's runs are exported as ``scripts/export_study.py`` exports them; each continued
run below ``SWEEP/plasticity/runs/`` (a directory with a ``plasticity.json``) lands under
``OUT/plasticity/runs/`` with its ``config.json``, ``metrics.jsonl``, ``status.json``,
``plasticity.json``, ``plasticity_spectra.parquet`` (the before/after measurements) and
``spectra.parquet``, both without eigenvalue lists. The continuations stay below the sweep
directory, where the report's plasticity section looks for them. Checkpoints are left behind.
Refuses (one line, nothing written) an existing non-empty destination or an export over ``--max-mb``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_study import export_study  # noqa: E402

from capscale.rundir import read_spectra, spectra_columns, write_spectra_part  # noqa: E402

CONT_FILES = ("config.json", "metrics.jsonl", "status.json", "plasticity.json")
CONT_SPECTRA = ("spectra.parquet", "plasticity_spectra.parquet")


def _strip(src: Path, dest: Path) -> None:
    """``src`` (a dataset of parts or a single file) as one zstd part without eigenvalue lists; a
    single file that holds none (the before/after measurements) is copied as it is."""
    columns = [c for c in spectra_columns(src) if c != "eigenvalues"]
    if src.is_file() and len(columns) == len(spectra_columns(src)):
        shutil.copy2(src, dest)
        return
    frame = read_spectra(src, columns=columns)
    if frame is not None:
        write_spectra_part(dest, frame, compression="zstd", compression_level=19)


def export_plasticity(sweep: Path, out: Path, *, max_mb: float = 5.0) -> tuple[int, int]:
    """Write the export to ``out``; returns (continued runs exported, bytes in all)."""
    conts = sorted(p.parent for p in (sweep / "plasticity" / "runs").glob("*/plasticity.json"))
    if not conts:
        raise ValueError(f"{sweep}/plasticity/runs holds no continued run (no plasticity.json)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; export into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / "export"
        export_study(sweep, stage, max_mb=max_mb)
        for run in conts:
            dest = stage / "plasticity" / "runs" / run.name
            dest.mkdir(parents=True)
            for name in CONT_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, dest / name)
            for name in CONT_SPECTRA:
                if (run / name).exists():
                    _strip(run / name, dest / name)
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        if size > max_mb * 1e6:
            raise ValueError(f"the export of {sweep} would be {size / 1e6:.1f} MB, over --max-mb {max_mb:g}")
        if out.exists():
            out.rmdir()
        stage.rename(out)
    return len(conts), size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep directory, its continuations in SWEEP/plasticity/runs")
    parser.add_argument("out", type=Path, help="the new export directory")
    parser.add_argument("--max-mb", type=float, default=5.0, help="refuse an export larger than this (MB)")
    parser.add_argument("--report", action="store_true", help="also build OUT/report from the export")
    args = parser.parse_args(argv)
    try:
        n, size = export_plasticity(args.sweep, args.out, max_mb=args.max_mb)
    except (ValueError, OSError) as e:
        print(f"export_plasticity: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {n} continued run(s), {size / 1e6:.2f} MB")
    if args.report:
        from capscale.report import build_report

        print(build_report(args.out).json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
