"""scripts/export_study.py: a sweep's results, small and without eigenvalues, that the report reads back."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from synthetic_runs import DEFAULT_SERIES, write_sweep

from capscale.analysis import load_sweep

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_study.py"


def _export(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def _tiny_sweep(root: Path) -> Path:
    write_sweep(root, series=DEFAULT_SERIES[2:3], widths=(32, 64, 128))  # Muon, 3 widths × 2 seeds
    (root / "sweep.json").write_text(json.dumps({"name": "tiny", "analysis": {"last_k": 2}}))
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
    meta = pq.ParquetFile(run / "spectra.parquet").metadata
    assert "eigenvalues" not in pq.read_schema(run / "spectra.parquet").names
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert (run / "spectra.parquet").stat().st_size < (sweep / "runs" / run.name / "spectra.parquet").stat().st_size
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
