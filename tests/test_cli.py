import re
import subprocess
import sys

import capscale
from capscale.cli import main


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"capscale {capscale.__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "version" in capsys.readouterr().out


def test_console_script_installed():
    out = subprocess.run(["capscale", "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: capscale" in out
    out = subprocess.run([sys.executable, "-m", "capscale", "version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("capscale ")


def test_unknown_command_fails():
    assert subprocess.run(["capscale", "no-such-command"], capture_output=True).returncode == 2


# -- first contact and refused input (issue 30, items 8 and 11) ---------------------------


def test_a_refused_sweep_writes_nothing(tmp_path, capsys):
    out = tmp_path / "D"
    assert main(["sweep", "--preset", "smoke", "--only", "zzz*", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'zzz*' matches none" in err[0]
    assert not out.exists()


def test_sweep_status_reads_the_preset_from_sweep_json(tmp_path, capsys):
    from capscale.sweep import load_spec
    from capscale.sweep.sweep import plan

    out = tmp_path / "demo"
    plan(load_spec("smoke"), out)
    assert main(["sweep", "--status", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("sweep smoke: ")
    assert main(["sweep", "--status", "--out", str(tmp_path / "none")]) == 2
    assert "holds no sweep (sweep.json missing): give --preset or --config" in capsys.readouterr().err
    (out / "sweep.json").write_text("[1]")
    assert main(["sweep", "--status", "--out", str(out)]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err


def test_sweep_help_lists_every_preset_and_report_help_says_where_defaults_come_from():
    from capscale.sweep import SWEEP_PRESETS

    sweep = subprocess.run([sys.executable, "-m", "capscale", "sweep", "--help"], capture_output=True, text=True)
    text = re.sub(r"-\s+", "-", sweep.stdout)  # argparse wraps lines at hyphens
    assert all(name in text for name in SWEEP_PRESETS) and "cpu-long" in text
    report = subprocess.run([sys.executable, "-m", "capscale", "report", "--help"], capture_output=True, text=True)
    assert "unset: the sweep's analysis.last_k, if it has one (default 5)" in " ".join(report.stdout.split())


def test_the_demo_exits_nonzero_when_runs_failed(tmp_path, monkeypatch, capsys):
    import json
    from types import SimpleNamespace

    import pandas as pd

    import capscale.report.build as build
    import capscale.sweep.sweep as sweep
    from capscale.sweep.executors import RunResult

    results = [RunResult("a_w32_s0", "done", 5, None, 1.0), RunResult("a_w64_s0", "failed", 0, "OOM", 1.0)]
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: results)
    (tmp_path / "report.json").write_text(json.dumps({"answers": []}))
    files = SimpleNamespace(
        analysis=SimpleNamespace(betas=pd.DataFrame(columns=["site", "bucket"])),
        json=tmp_path / "report.json",
        html="r.html",
        markdown="r.md",
    )
    monkeypatch.setattr(build, "build_report", lambda out: files)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 1
    assert "1 run(s) did not finish: a_w64_s0 (failed)" in capsys.readouterr().err
    results.pop()
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0


def test_help_imports_nothing_heavy():
    code = (
        "import sys, runpy; sys.argv = ['capscale', '--help']\n"
        "try:\n    runpy.run_module('capscale', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('numpy', 'scipy.stats', 'pandas', 'matplotlib', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: capscale" in r.stdout


def test_a_damaged_request_json_is_one_line_and_nothing_is_written(tmp_path, capsys):
    from capscale.sweep import load_spec
    from capscale.sweep.sweep import plan

    out = tmp_path / "s"
    plan(load_spec("smoke"), out)
    request = sorted((out / "runs").glob("*/request.json"))[1]
    for text, message in (("[1]", "must hold a JSON object, not list"), ('{"model": [1]}', "is not a run config")):
        request.write_text(text)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        smoke = ["sweep", "--preset", "smoke", "--out", str(out)]
        assert main([*smoke, "--status"]) == 0  # reading the states needs no request
        capsys.readouterr()
        assert main([*smoke, "--only", "zzz*"]) == 2  # refused before planning
        assert main([*smoke, "--workers", "1", "--only", "adamw_w32_s0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and str(request) in err[1] and message in err[1], err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
