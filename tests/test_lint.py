"""The test command fails on a lint or format error: ruff, configured in pyproject.toml."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff")
    if exe is None:  # installed by `scripts/setup.sh --test`; its absence is a set-up error, not a skip
        pytest.fail("ruff is not installed: run `bash scripts/setup.sh --test`")
    return [exe]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args):
    proc = subprocess.run(_ruff() + args, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"


def test_ruff_would_catch_an_error(tmp_path):
    # the check above is live: the same configuration refuses an unused import
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    proc = subprocess.run(
        _ruff() + ["check", "--config", str(ROOT / "pyproject.toml"), str(bad)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "F401" in proc.stdout, proc.stdout
