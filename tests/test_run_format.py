"""Runs written by attach(out=) from a plain loop are found below any root and analysed at their measured width."""

import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.analysis.runs import load_sweep

V = 40


def _run(out, opt_name, width, seed=0, steps=3, finish=True, **cfg):
    torch.manual_seed(seed)
    model = toy(vocab=V, h=width, seed=seed).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = capscale.attach(model, every=1, out=out, run_config={"optimizer": opt_name, "seed": seed, **cfg})
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ids = torch.randint(0, V, (4, 8), generator=g)
        loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        probe.step()
        probe.log(step + 1, loss=loss.item(), val_loss=loss.item() + 0.1)
    if finish:
        probe.close()
    return probe


def test_runs_below_any_root_are_found_and_widths_measured(tmp_path, one_thread):
    root = tmp_path / "my_sweep"
    for opt_name in ("sgd", "sgd_fast"):
        for width in (6, 12, 24):
            _run(root / opt_name / f"w{width}", opt_name, width)
    _run(root / "sgd" / "crashed", "sgd", 48, finish=False)  # killed mid-run: status stays "running"
    (root / "notes").mkdir()  # not a run: ignored
    sweep = load_sweep(root)
    runs = sweep.runs.set_index("run_id")
    assert sorted(runs.index) == sorted(f"{o}/w{w}" for o in ("sgd", "sgd_fast") for w in (6, 12, 24))
    assert runs.loc["sgd_fast/w24", "width"] == 24 and runs.loc["sgd/w6", "width"] == 6  # from spectra "dim"
    assert set(runs["series"]) == {"sgd", "sgd_fast"}
    assert (runs["steps"] == 3).all()  # no step budget given: where the run ended
    assert runs.loc["sgd/w12", "final_val_loss"] == pytest.approx(
        sweep.metrics.query("run_id == 'sgd/w12'").val_loss.iloc[-1]
    )
    ex = sweep.excluded.set_index("run_id")
    assert list(ex.index) == ["sgd/crashed"] and "unfinished" in ex.loc["sgd/crashed", "reason"]


def test_declared_width_and_variant(tmp_path, one_thread):
    for variant in ("a", "b"):
        _run(tmp_path / variant, "sgd", 6, ffn_width=600, variant=variant)
    runs = load_sweep(tmp_path).runs.set_index("run_id")
    assert (runs["width"] == 600).all()  # a declared width wins over the measured one
    assert sorted(runs["series"]) == ["sgd · variant=a", "sgd · variant=b"]


def test_a_run_written_by_hand_is_analysed(tmp_path, one_thread):
    """docs/run-format.md is enough: a config naming only the optimizer, a status, spectra rows."""
    import json

    import pandas as pd

    for width in (6, 12, 24):
        _run(tmp_path / "src" / f"w{width}", "sgd", width)
        hand = tmp_path / "root" / "by_hand" / f"w{width}"
        hand.mkdir(parents=True)
        # one Parquet file, as a person writes it (the harness writes a dataset of part files)
        pd.read_parquet(tmp_path / "src" / f"w{width}" / "spectra.parquet").to_parquet(hand / "spectra.parquet")
        (hand / "config.json").write_text(json.dumps({"optimizer": "mine"}))
        (hand / "status.json").write_text(json.dumps({"status": "done", "step": 3}))
    runs = load_sweep(tmp_path / "root").runs
    assert sorted(runs.width) == [6, 12, 24] and set(runs.series) == {"mine"} and (runs.steps == 3).all()
    newer = tmp_path / "root" / "by_hand" / "w6" / "config.json"
    newer.write_text(json.dumps({"optimizer": "mine", "format_version": 2}))
    ex = load_sweep(tmp_path / "root").excluded
    assert "format_version 2" in ex.set_index("run_id").loc["by_hand/w6", "reason"]
