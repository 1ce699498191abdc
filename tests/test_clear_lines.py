"""Bad run directories and config files: one clear line naming the file, and nothing written."""

import json
import logging
import re

import numpy as np
import pytest
from synthetic_runs import DEFAULT_SERIES, planted_run

from capscale.analysis import load_sweep
from capscale.cli import main

MUON = DEFAULT_SERIES[2]


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _damage_middle_metrics_line(run):
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 20, "lo\n'
    (run / "metrics.jsonl").write_text("".join(lines))


# (what is wrong with the one run, what the line says)
REPORT_CASES = {
    "optimizer as a number": (
        lambda run: _edit_json(run / "config.json", lambda c: c.update(optimizer=5)),
        r"config\.json: optimizer must be a JSON object, got 5",
    ),
    "train.steps a string": (
        lambda run: _edit_json(run / "config.json", lambda c: c["train"].update(steps="many")),
        r"config\.json: train\.steps must be an integer >= 1, got 'many'",
    ),
    "status.json a list": (
        lambda run: (run / "status.json").write_text('["done", 60]'),
        r"status\.json must hold a JSON object, not list",
    ),
    "status.json an unknown status": (
        lambda run: (run / "status.json").write_text('{"status": "finished", "step": 60}'),
        r"status\.json: 'status' must be one of",
    ),
    "config.json not JSON": (
        lambda run: (run / "config.json").write_text("[model]\nd_model = 64\n"),
        r"config\.json is not valid JSON",
    ),
    "damaged middle metrics line": (
        _damage_middle_metrics_line,
        r"metrics\.jsonl line 2 is damaged",
    ),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_report_on_a_bad_run_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    damage, message = REPORT_CASES[case]
    run = planted_run(tmp_path / "r", MUON, 32, 0, np.random.default_rng(0))
    damage(run)
    before = sorted(p.name for p in run.iterdir())
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capscale report: error: no finished runs") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in run.iterdir()) == before  # no report/ folder


@pytest.mark.parametrize(
    "change",
    [lambda c: c.update(optimizer=c["optimizer"]["name"]), lambda c: c["train"].update(steps=None)],
    ids=["optimizer as its name", "train.steps null"],
)
def test_what_the_run_format_fills_in_is_analysed_not_refused(tmp_path, change):
    # docs/run-format.md: an optimizer given by its name, a step budget left out (the status's step)
    run = planted_run(tmp_path / "r", MUON, 32, 0, np.random.default_rng(0))
    want = load_sweep(run).runs[["series", "width", "steps"]]
    _edit_json(run / "config.json", change)
    got = load_sweep(run).runs[["series", "width", "steps"]]
    assert got.equals(want), (got, want)


def test_a_torn_last_metrics_line_keeps_the_previous_records_and_says_so(tmp_path, caplog):
    run = planted_run(tmp_path / "r", MUON, 32, 0, np.random.default_rng(0))
    whole = load_sweep(run).runs["final_val_loss"].iloc[0]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 70, "loss": 1.0, "val_loss": 0.1')  # a kill in the middle of the last append
    with caplog.at_level(logging.WARNING, logger="capscale.rundir"):
        sweep = load_sweep(run)
    assert sweep.runs["final_val_loss"].iloc[0] == whole  # not 0.1, and not an older eval either
    assert f"{run / 'metrics.jsonl'}: dropped its torn last line" in caplog.text


YAML_TAG = "name: x\ntrain: !!python/object/apply:os.system ['echo pwned > {marker}']\n"


def test_a_yaml_python_tag_is_refused_in_one_line_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(YAML_TAG.format(marker=marker))
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config file {cfg} cannot be read" in err
    assert "yaml.safe_load" in err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("c.toml", "train = [", r"config file .*c\.toml cannot be read: "),
        ("c.json", "[1, 2]", r"config file .*c\.json must hold a table of keys, not list"),
        ("c.yaml", "- a\n- b\n", r"config file .*c\.yaml must hold a table of keys, not list"),
    ],
)
def test_an_unreadable_config_file_is_one_line_naming_it(tmp_path, capsys, name, text, message):
    cfg = tmp_path / name
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()
