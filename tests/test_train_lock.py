"""`capscale train` holds its run directory: a second one refuses at once; a resume cleans up and reads by the contract."""

import json
import re
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from capscale.cli import main
from capscale.rundir import RunDir
from capscale.train.corpus import is_installed

pytestmark = pytest.mark.skipif(not is_installed(), reason="default corpus not fetched")


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_two_trains_on_one_directory_one_refuses_and_the_other_ends_intact(tmp_path, capsys):
    out = tmp_path / "run"
    # long enough (400 steps) that the first is still training when the second starts, on a quiet machine too
    args = ["train", "--preset", "smoke", "--set", "train.progress=false", "--set", "train.steps=400"]
    args += ["--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "capscale", *args], stderr=subprocess.PIPE, text=True)
    run = RunDir(out)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not run.status_path.exists():
        time.sleep(0.02)
    assert first.poll() is None, first.stderr.read()
    assert main(args) == 2  # the second one, while the first trains
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is being trained by another process" in err
    assert f"pid {first.pid} on {socket.gethostname()}" in err
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    steps = [r["step"] for r in run.read_metrics()]
    assert steps == list(range(5, 401, 5))  # each step once
    spectra = pd.read_parquet(out / "spectra.parquet")
    assert not spectra.duplicated(["step", "layer", "site", "bucket"]).any()
    assert json.loads(run.status_path.read_text())["status"] == "done"
    assert not run.lock_path.exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    assert main(["train", "--preset", "smoke", "--set", "train.steps=10", "--out", str(out)]) == 0
    return out


def test_rerun_removes_orphaned_temp_files_of_killed_writes(finished):
    orphans = [
        finished / "checkpoints" / ".step_00000020.pt.4242.0badf00d.tmp",
        finished / ".status.json.4242.0badf00d.tmp",
        finished / "spectra.parquet" / ".part-00000009-00000020-00000020.parquet.4242.0badf00d.tmp",
    ]
    for p in orphans:
        p.write_bytes(b"\0" * 1000)
    assert main(["train", "--preset", "smoke", "--set", "train.steps=10", "--out", str(finished)]) == 0
    assert not any(p.exists() for p in orphans)


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("status.json", '["running", 5]', r"status\.json must hold a JSON object, not list"),
        ("config.json", "{broken", r"config\.json is not valid JSON"),
    ],
)
def test_resume_on_a_malformed_file_is_one_line_and_changes_nothing(finished, tmp_path, capsys, file, text, message):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    (out / file).write_text(text)
    before = _snapshot(out)
    assert main(["train", "--preset", "smoke", "--set", "train.steps=10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / file) in err, err
    assert re.search(message, err), err
    assert _snapshot(out) == before
