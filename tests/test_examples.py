"""The telemetry examples run at toy size, write run directories the report reads, and the README quotes them.

The HF Trainer sweep is the end-to-end check: one callback line per run, two optimizers
x three widths, and ``capscale report`` gives beta with intervals for both series.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import capscale
from capscale.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name, out, timeout=300):
    # the capscale under test, whatever the working directory (a relative PYTHONPATH would not follow)
    path = os.pathsep.join([str(Path(capscale.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--out", str(out), "--toy"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=out.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def assert_done_run(path, steps):
    run = RunDir(path)
    assert run.read_status()["status"] == "done" and run.read_config()["format_version"] == 1
    assert run.read_config()["train"]["steps"] == steps
    spectra = run.read_spectra()
    assert set(spectra.bucket) == {"all", "head", "mid", "tail"} and spectra.soft_rank.notna().any()
    return run


def test_plain_loop(tmp_path):
    run_example("plain_loop.py", tmp_path / "w32")
    run = assert_done_run(tmp_path / "w32", 6)
    assert [m["step"] for m in run.read_metrics()] == [1, 2, 3, 4, 5, 6]
    assert sorted(run.read_spectra().step.unique()) == [0, 2, 4, 5]


def test_nanogpt_style(tmp_path):
    run_example("nanogpt_style.py", tmp_path / "adamw_w64")
    run = assert_done_run(tmp_path / "adamw_w64", 6)
    assert [m["step"] for m in run.read_metrics() if "val_loss" in m] == [0, 3, 5]
    assert set(run.read_spectra().dim) == {64}


def test_lightning_module(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    run_example("lightning_module.py", tmp_path / "sgd_w32")
    run = assert_done_run(tmp_path / "sgd_w32", 6)
    assert [m["step"] for m in run.read_metrics() if "val_loss" in m] == [2, 4, 6]
    assert list((tmp_path / "tb" / "sgd_w32").rglob("events.out.tfevents.*"))


def test_hf_trainer_width_sweep_to_report(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    out = tmp_path / "hf_sweep"
    stdout = run_example("hf_trainer_sweep.py", out, timeout=600)
    assert "analysed 6 run(s) in 2 series; 0 not analysed" in stdout
    report = json.loads((out / "report" / "report.json").read_text())
    assert (out / "report" / "index.html").stat().st_size > 10_000
    runs = pd.DataFrame(report["runs"])
    assert sorted(runs.groupby("series").width.apply(sorted).items()) == [
        ("adamw_torch", [16, 32, 64]),
        ("sgd", [16, 32, 64]),
    ]  # widths measured from the activations: the runs did not say them
    headline = [b for b in report["betas"] if b["bucket"] == "all" and b["site"] == "post"]
    assert sorted(b["series"] for b in headline) == ["adamw_torch", "sgd"]
    for b in headline:
        for kind in ("beta_soft", "beta_hard"):
            fit = b[kind]
            assert fit["fittable"] and fit["n"] == 3
            assert fit["ci_low"] < fit["beta"] < fit["ci_high"]
            # one seed per width: the spread over layers is not shown as uncertainty, and the row says so
            assert fit["boot_low"] is None and fit["interval_over"].startswith("widths only (one seed")
    assert runs.final_val_loss.notna().all()  # the trainer's eval loss reached the runs


def _telemetry_code():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Telemetry in your own loop", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_telemetry_snippets_are_copied_from_the_examples():
    blocks = _telemetry_code()
    assert len(blocks) >= 3
    sources = "\n".join(re.sub(r"\s+", " ", p.read_text()) for p in EXAMPLES.glob("*.py"))
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and line != "...":
                assert re.sub(r"\s+", " ", line) in sources, f"README line not in any example: {line!r}"
