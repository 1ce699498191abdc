"""Sinks: JSONL / Parquet append-only and atomic, TensorBoard events, W&B offline, console, scalars."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.probe import COLUMNS, ConsoleSink, JSONLSink, ParquetSink, scalar_summary
from capscale.spectrum import FrequencyTable

V = 50


def ids(seed):
    return torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(seed))


def run(sinks, steps=3, every=1, table=None):
    model = toy()
    with capscale.attach(model, every=every, sinks=sinks, freq_table=table) as probe:
        for s in range(steps):
            model(ids(s))
            probe.step()
        return probe.compute(reset=False)


def test_parquet_appends_atomically_and_reads_back(tmp_path):
    path = tmp_path / "run" / "spectra.parquet"
    table = FrequencyTable(np.arange(1, V + 1)[::-1].copy())
    df = run([ParquetSink(path)], steps=3, table=table)
    back = pd.read_parquet(path)
    assert list(back.columns) == list(COLUMNS)
    assert len(back) == len(df) == 3 * 2 * 2 * 4
    assert back[["step", "layer", "site", "bucket"]].drop_duplicates().shape[0] == len(back)
    assert back.layer.dtype == np.int64 and back.step.dtype == np.int64
    np.testing.assert_allclose(back.soft_rank, df.soft_rank)
    parts = sorted(path.iterdir())  # a dataset: one part file per window, no temp files left
    assert [p.name for p in parts] == [f"part-{i:08d}-{i:08d}-{i:08d}.parquet" for i in range(3)]
    assert all(str(pq.read_schema(p).field("eigenvalues").type) == "list<element: double>" for p in parts)
    assert [p.name for p in path.parent.iterdir()] == ["spectra.parquet"]
    # A second probe (a resumed run) appends; the rows already there are untouched.
    run([ParquetSink(path)], steps=1)
    again = pd.read_parquet(path)
    assert len(again) == len(back) + 4
    pd.testing.assert_frame_equal(again.iloc[: len(back)].reset_index(drop=True), back)


def test_parquet_types_eigenvalues_even_when_all_insufficient(tmp_path):
    model = toy()
    path = tmp_path / "s.parquet"
    with capscale.attach(model, every=1, sinks=[ParquetSink(path)]) as probe:
        model(torch.tensor([[3]]))  # one row: every spectrum insufficient
        probe.step()
        model(ids(0))
    back = pd.read_parquet(path)
    assert list(back.sampling_status[:4]) == ["insufficient"] * 4 and back.eigenvalues[:4].isna().all()
    assert len(back.eigenvalues.iloc[-1]) == 12


def test_jsonl_appends_lines_with_nulls(tmp_path):
    path = tmp_path / "spectra.jsonl"
    model = toy()
    with capscale.attach(model, every=1, sinks=[JSONLSink(path)]) as probe:
        model(torch.tensor([[3]]))
        probe.step()
        model(ids(1))
    lines = path.read_text().splitlines()
    assert len(lines) == 8
    recs = [json.loads(line) for line in lines]
    assert recs[0]["soft_rank"] is None and recs[0]["eigenvalues"] is None and recs[0]["step"] == 0
    assert recs[-1]["step"] == 1 and len(recs[-1]["eigenvalues"]) == 12 and recs[-1]["soft_rank"] > 1


def test_scalar_summary_is_the_mean_over_layers():
    df = run([], steps=1)
    sc = scalar_summary(df)
    pre = df[(df.site == "pre") & (df.bucket == "all")]
    assert sc["capscale/pre/all/soft_rank"] == pytest.approx(pre.soft_rank.mean())
    assert sc["capscale/post/all/hard_rank"] == pytest.approx(df[df.site == "post"].hard_rank.mean())
    assert set(sc) == {f"capscale/{s}/all/{r}" for s in ("pre", "post") for r in ("soft_rank", "hard_rank")}


def test_console_prints_one_line_per_measurement(capsys):
    run([ConsoleSink()], steps=2)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("[capscale] step 0:") and "pre/all/soft_rank=" in out[0]


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from capscale.probe import TensorBoardSink

    table = FrequencyTable(np.arange(1, V + 1)[::-1].copy())
    df = run([TensorBoardSink(tmp_path / "tb")], steps=3, every=2, table=table)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    ev = acc.Scalars("capscale/soft_rank/median/pre")  # the headline: median over layers, as the report
    assert [e.step for e in ev] == [0, 2]  # at the measured steps
    at0 = df[(df.step == 0) & (df.bucket == "all")].set_index(["site", "layer"])
    assert ev[0].value == pytest.approx(at0.loc["pre"].soft_rank.median(), rel=1e-6)
    layer1 = acc.Scalars("capscale/hard_rank_per_width/layer01/post")[0].value
    assert layer1 == pytest.approx(at0.loc[("post", 1), "hard_rank"] / 12, rel=1e-6)
    tail = df[(df.step == 0) & (df.bucket == "tail") & (df.site == "post")].soft_rank.median()
    assert acc.Scalars("capscale/soft_rank/tail/post")[0].value == pytest.approx(tail, rel=1e-6)
    assert acc.Scalars("capscale/samples_per_dim/layer00/pre")[0].value == pytest.approx(12 / 12)
    assert acc.Scalars("capscale/undersampled_layers/pre")[0].value == 2  # N/D = 1 in both layers
    hist = acc.Histograms("capscale/eigenvalues/layer00/pre")
    assert [h.step for h in hist] == [0, 2]
    eigs = np.log10(at0.loc[("pre", 0), "eigenvalues"])
    assert hist[0].histogram_value.num == 12 and hist[0].histogram_value.sum == pytest.approx(eigs.sum(), rel=1e-5)
    assert not [t for t in acc.Tags()["scalars"] if not t.startswith("capscale/")]


def test_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from capscale.probe import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    user_run = wandb.init(project="capscale-test", dir=str(tmp_path / "a"))
    run([WandbSink(user_run)], steps=2)  # a run it did not start: left open
    assert user_run.summary["capscale/step"] == 1 and user_run.summary["capscale/soft_rank/median/pre"] > 1
    assert user_run.summary["capscale/hard_rank/layer01/post"] > 1
    assert user_run.summary["capscale/eigenvalues/layer00/pre"]["_type"] == "histogram"
    user_run.finish()
    assert list(tmp_path.glob("a/wandb/offline-run-*/run-*.wandb"))
    run([WandbSink(project="capscale-test", dir=str(tmp_path / "b"))], steps=1)  # starts and finishes its own
    assert wandb.run is None and list(tmp_path.glob("b/wandb/offline-run-*/run-*.wandb"))
