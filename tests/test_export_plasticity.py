"""scripts/export_plasticity.py: a sweep and its continuations, small, that the plasticity section reads back;
and the committed cpu-long-plasticity export against report.json and docs/beyond.md."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from synthetic_runs import DEFAULT_SERIES, write_sweep

from capscale.analysis import load_sweep
from capscale.analysis.aggregate import aggregate_runs, last_k_per_layer
from capscale.analysis.plasticity import find_plasticity, join_capacity, plasticity_relation

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "export_plasticity.py"
RESULTS = ROOT / "docs" / "results" / "cpu-long-plasticity"


def _run(script: Path, *args):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)


def _sweep_with_continuations(root: Path) -> Path:
    write_sweep(root, series=DEFAULT_SERIES[2:3], widths=(32, 64))  # Muon, 2 widths × 2 seeds
    (root / "sweep.json").write_text(json.dumps({"name": "tiny"}))
    for i, src in enumerate(sorted((root / "runs").iterdir())):
        (src / "checkpoints").mkdir()
        (src / "checkpoints" / "step_60.pt").write_bytes(b"x" * 1000)
        cont = root / "plasticity" / "runs" / src.name
        shutil.copytree(src, cont)  # a run directory, spectra with eigenvalue lists, a checkpoint
        frame = pd.read_parquet(src / "spectra.parquet").drop(columns="eigenvalues")
        frame.to_parquet(cont / "plasticity_spectra.parquet")
        summary = {"run_id": src.name, "from_run": f"/elsewhere/runs/{src.name}", "steps": 4, "label": "muon"}
        summary |= {"seed": int(src.name[-1]), "auc_new": 5.0 + i, "adaptation": 0.5, "forgetting": 0.1 * i}
        (cont / "plasticity.json").write_text(json.dumps(summary))
    return root


def test_export_keeps_the_continuations_below_the_sweep_without_eigenvalues_or_checkpoints(tmp_path):
    sweep = _sweep_with_continuations(tmp_path / "sweep")
    out = tmp_path / "results" / "tiny"
    res = _run(SCRIPT, sweep, out)
    assert res.returncode == 0, res.stderr
    assert "4 continued run(s)" in res.stdout
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(p.name for p in (sweep / "runs").iterdir())
    assert not list(out.rglob("checkpoints")) and not list(out.rglob("*.pt"))
    cont = out / "plasticity" / "runs" / "muon_w32_rope_t60_s0"
    assert sorted(p.name for p in cont.iterdir()) == [
        "config.json", "metrics.jsonl", "plasticity.json", "plasticity_spectra.parquet", "spectra.parquet", "status.json",
    ]  # fmt: skip
    (part,) = (cont / "spectra.parquet").iterdir()
    assert "eigenvalues" not in pq.read_schema(part).names
    source = sweep / "plasticity" / "runs" / cont.name
    assert len(pd.read_parquet(part)) == len(pd.read_parquet(source / "spectra.parquet"))
    assert (cont / "plasticity_spectra.parquet").read_bytes() == (source / "plasticity_spectra.parquet").read_bytes()
    # what the report's section reads: every result found below the export, joined to its run by name
    results = find_plasticity(out)
    assert len(results) == 4
    sw = load_sweep(out)
    joined = join_capacity(results, aggregate_runs(last_k_per_layer(sw.spectra, 2)), sw.runs)
    assert joined["pre_run_id"].notna().all() and np.isfinite(joined["pre_hard_rank"].astype(float)).all()


def test_export_refuses_in_one_line_and_writes_nothing(tmp_path):
    sweep = _sweep_with_continuations(tmp_path / "sweep")
    res = _run(SCRIPT, sweep, tmp_path / "big", "--max-mb", "0.001")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "over --max-mb" in res.stderr
    assert not (tmp_path / "big").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".big")]
    shutil.rmtree(sweep / "plasticity")
    res = _run(SCRIPT, sweep, tmp_path / "out")
    assert res.returncode == 2 and "no continued run" in res.stderr and not (tmp_path / "out").exists()


committed = pytest.mark.skipif(
    not (RESULTS / "report" / "report.json").is_file(), reason="no committed cpu-long-plasticity export"
)


@committed
def test_the_committed_report_holds_the_committed_continuations_and_their_regression():
    q = json.loads((RESULTS / "report" / "report.json").read_text())["plasticity"]
    assert q["shown"] and q["n_matched"] == q["n_results"] == 18 and q["n_seeds"] == 3
    runs = pd.DataFrame(q["runs"])
    for _, r in runs.iterrows():  # every row is its continuation's plasticity.json and its run's final loss
        res = json.loads((RESULTS / "plasticity" / "runs" / r["pre_run_id"] / "plasticity.json").read_text())
        for key in ("val_loss_new_0", "auc_new", "adaptation", "forgetting", "post_hard_rank_0", "post_dormant_frac_k"):
            assert r[key] == pytest.approx(res[key], rel=1e-12)
        metrics = (RESULTS / "runs" / r["pre_run_id"] / "metrics.jsonl").read_text().splitlines()
        assert r["pre_val_loss"] == pytest.approx(json.loads(metrics[-1])["val_loss"], rel=1e-12)
    # the slopes are the regression of those rows
    for y in ("auc_new", "adaptation", "forgetting"):
        refit = plasticity_relation(runs, y=y).set_index("kind")
        for stored in (r for r in q["relation"] if r["y"] == y):
            for key in ("slope", "ci_low", "ci_high"):
                assert stored[key] == pytest.approx(
                    refit.at[stored["kind"], key], rel=1e-6, abs=1e-9
                )  # report.json rounds


@committed
def test_the_plasticity_tables_on_beyond_md_are_printed_from_the_committed_export():
    out = _run(ROOT / "scripts" / "plasticity_tables.py", RESULTS)
    assert out.returncode == 0, out.stderr
    doc = (ROOT / "docs" / "beyond.md").read_text()
    sections = [block.partition("\n")[2].strip() for block in out.stdout.split("## ")[1:]]
    assert len(sections) == 4
    for body in sections[:3]:  # the tables, verbatim
        assert body in doc, f"not on the page as printed:\n{body}"
