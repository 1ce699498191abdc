"""scripts/export_study.py: a sweep's results, small and without eigenvalues, that the report reads back."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from synthetic_runs import DEFAULT_SERIES, write_sweep

from capscale.analysis import load_sweep
from capscale.rundir import write_spectra_part

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_study.py"


def _export(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def _tiny_sweep(root: Path) -> Path:
    write_sweep(root, series=DEFAULT_SERIES[2:3], widths=(32, 64, 128))  # Muon, 3 widths × 2 seeds
    (root / "sweep.json").write_text(json.dumps({"name": "tiny", "analysis": {"last_k": 2}}))
    # one run in the current format, a dataset of part files (the others older single files)
    spectra = root / "runs" / "muon_w64_rope_t60_s1" / "spectra.parquet"
    frame = pd.read_parquet(spectra)
    spectra.unlink()
    for _, part in frame.groupby("step"):
        write_spectra_part(spectra, part)
    (root / "runs" / "muon_w32_rope_t60_s0" / "checkpoints").mkdir()
    (root / "runs" / "muon_w32_rope_t60_s0" / "checkpoints" / "step_60.pt").write_bytes(b"x" * 1000)
    return root


def test_export_drops_eigenvalues_compresses_and_reanalyses_the_same(tmp_path):
    sweep = _tiny_sweep(tmp_path / "sweep")
    out = tmp_path / "results" / "tiny"
    res = _export(sweep, out, "--report")
    assert res.returncode == 0, res.stderr
    run = out / "runs" / "muon_w32_rope_t60_s0"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "spectra.parquet", "status.json"]
    for name in ("muon_w32_rope_t60_s0", "muon_w64_rope_t60_s1"):  # from a single file, from a dataset
        (part,) = (out / "runs" / name / "spectra.parquet").iterdir()  # one part of the run format
        meta = pq.ParquetFile(part).metadata
        assert "eigenvalues" not in pq.read_schema(part).names
        assert meta.row_group(0).column(0).compression == "ZSTD"
        source = sweep / "runs" / name / "spectra.parquet"
        assert part.stat().st_size < sum(p.stat().st_size for p in [source, *source.rglob("*")] if p.is_file())
        assert len(pd.read_parquet(part)) == len(pd.read_parquet(source))
    # the analysis of the export is the analysis of the sweep
    a, b = load_sweep(sweep), load_sweep(out)
    assert a.spectra.drop(columns="run_id").equals(b.spectra.drop(columns="run_id"))
    assert a.runs.drop(columns="path").equals(b.runs.drop(columns="path"))
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["sweep"]["name"] == "tiny" and report["parameters"]["last_k"] == 2
    assert report["beta_trajectory"]["fits"]


def test_export_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
    res = _export(tmp_path / "nowhere", tmp_path / "out")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not a sweep directory" in res.stderr
    assert not (tmp_path / "out").exists()
    sweep = _tiny_sweep(tmp_path / "sweep")
    res = _export(sweep, tmp_path / "big", "--max-mb", "0.001")
    assert res.returncode == 2 and "over --max-mb" in res.stderr and not (tmp_path / "big").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".big")]  # no staging left behind
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    res = _export(sweep, tmp_path / "full")
    assert res.returncode == 2 and "not empty" in res.stderr
