"""capscale.analysis: loading run directories, the aggregation convention, and bad input."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import (
    DEFAULT_SERIES,
    config,
    planted_run,
    summary_rows,
    write_run,
    write_sweep,
    write_unfinished,
)

from capscale.analysis import (
    IncompatibleRunsError,
    NoFinishedRunsError,
    aggregate_runs,
    analyze,
    last_k_per_layer,
    load_sweep,
)

ADAMW, MUON, DION = DEFAULT_SERIES[0], DEFAULT_SERIES[2], DEFAULT_SERIES[3]


# -- the aggregation convention on real spectra -----------------------------------------


def _real_run(tmp_path, rng):
    """One run whose records are spectrum_summary of random spectra; one late record is 'insufficient'."""
    dim, steps, layers = 16, [100, 200, 300, 400, 500, 600, 700], [0, 1, 2]
    eigs = {}
    for step in steps:
        for layer in layers:
            for bucket in ("all", "tail"):
                decay = rng.uniform(0.5, 0.95)
                eigs[(step, layer, "post", bucket)] = decay ** np.arange(dim) * rng.uniform(0.5, 2.0)
    eigs[(600, 1, "post", "tail")] = None  # too few samples: NaN ranks, kept as a record
    rows = summary_rows(eigs, n_samples=400, dim=dim)
    cfg = config("real", MUON, dim, 0)
    return write_run(tmp_path / "runs" / "real", cfg, rows, [{"step": 700, "loss": 1.0, "val_loss": 1.1}]), rows


@pytest.mark.parametrize("last_k", [5, 2])
def test_aggregation_is_median_of_last_k_steps_then_median_over_layers(tmp_path, last_k):
    _, rows = _real_run(tmp_path, np.random.default_rng(0))
    sweep = load_sweep(tmp_path)
    points = aggregate_runs(last_k_per_layer(sweep.spectra, last_k)).set_index(["site", "bucket"])
    df = pd.DataFrame(rows)
    for bucket in ("all", "tail"):
        for metric in ("soft_rank", "hard_rank", "asymmetry"):
            per_layer = []
            for layer in (0, 1, 2):
                recs = df[(df["layer"] == layer) & (df["bucket"] == bucket)].sort_values("step")
                last = recs[metric].to_numpy()[-last_k:]  # the last k *logged* steps, NaN included
                per_layer.append(np.nanmedian(last))  # ... whose NaN (insufficient) records are skipped
            expected = float(np.median(per_layer))
            assert points.loc[("post", bucket), metric] == pytest.approx(expected, rel=1e-12, abs=0)
    assert points.loc[("post", "tail"), "worst_status"] == "insufficient"  # the skipped record is still reported
    assert points.loc[("post", "all"), "n_layers"] == 3
    assert points.loc[("post", "all"), "n_steps"] == last_k


def test_all_nan_layer_stays_nan(tmp_path):
    eigs = {(s, 0, "post", "all"): None for s in (1, 2, 3)}
    eigs.update({(s, 1, "post", "all"): 0.8 ** np.arange(8) for s in (1, 2, 3)})
    write_run(tmp_path / "r", config("r", MUON, 8, 0), summary_rows(eigs, 100, 8), [{"step": 3, "loss": 1.0}])
    sweep = load_sweep(tmp_path / "r")  # a single run directory is accepted too
    per_layer = last_k_per_layer(sweep.spectra, 5).set_index("layer")
    assert math.isnan(per_layer.loc[0, "soft_rank"])
    # median over layers skips the NaN layer rather than becoming NaN
    assert aggregate_runs(per_layer.reset_index())["soft_rank"].iloc[0] == per_layer.loc[1, "soft_rank"]
    with pytest.raises(ValueError, match="last_k"):
        last_k_per_layer(sweep.spectra, 0)


# -- loading ------------------------------------------------------------------------------


def test_list_of_run_dirs_and_arch_axes_only_when_varying(tmp_path):
    rng = np.random.default_rng(1)
    dirs = [planted_run(tmp_path / f"m{w}", MUON, w, 0, rng) for w in (32, 64, 128)]
    sweep = load_sweep(dirs)
    assert sweep.arch_axes == () and set(sweep.runs["series"]) == {"muon"}
    assert sweep.root is None and len(sweep.runs) == 3


def test_torn_last_metrics_line_is_tolerated_but_corruption_is_reported(tmp_path):
    rng = np.random.default_rng(2)
    for w in (32, 64, 128):
        planted_run(tmp_path / "runs" / f"m{w}", MUON, w, 0, rng)
    with open(tmp_path / "runs" / "m32" / "metrics.jsonl", "a") as f:
        f.write('{"step": 61, "lo')  # an append cut short
    bad = tmp_path / "runs" / "m64" / "metrics.jsonl"
    bad.write_text("not json\n" + bad.read_text())
    sweep = load_sweep(tmp_path)
    assert set(sweep.runs["run_id"]) == {"m32", "m128"}
    assert sweep.excluded.set_index("run_id").loc["m64", "reason"].startswith("done, but unreadable")


def test_done_run_without_spectra_is_excluded_with_reason(tmp_path):
    rng = np.random.default_rng(3)
    planted_run(tmp_path / "runs" / "ok", MUON, 32, 0, rng)
    (planted_run(tmp_path / "runs" / "nospec", MUON, 64, 0, rng) / "spectra.parquet").unlink()
    sweep = load_sweep(tmp_path)
    assert "spectra.parquet is missing" in sweep.excluded.set_index("run_id").loc["nospec", "reason"]


# -- bad input ----------------------------------------------------------------------------


def test_no_finished_runs_is_a_clear_error(tmp_path):
    write_unfinished(tmp_path, MUON, 32, "running", None)
    write_unfinished(tmp_path, MUON, 64, "failed", "CUDA out of memory")
    with pytest.raises(NoFinishedRunsError, match=r"no finished runs .*failed: 1.*running: 1|running: 1.*failed: 1"):
        load_sweep(tmp_path)
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(NoFinishedRunsError, match="none found"):
        load_sweep(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such sweep"):
        load_sweep(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a sweep directory"):
        load_sweep(tmp_path / "empty" / "runs")


def test_fewer_than_three_widths_is_not_fittable(tmp_path):
    write_sweep(tmp_path, series=(MUON,), widths=(32, 64))
    a = analyze(tmp_path, n_resamples=200)
    assert not a.fits["fittable"].any()
    assert a.fits["reason"].str.startswith("not fittable: 2 width(s) with finite ranks").all()
    assert a.fits["beta"].isna().all()
    assert (a.betas["n_widths"] == 2).all()


def test_nan_ranks_reduce_the_widths_of_a_fit(tmp_path):
    rng = np.random.default_rng(4)
    for w in (32, 64, 128):
        planted_run(tmp_path / "runs" / f"m{w}", MUON, w, 0, rng, widths=(32, 64, 128))
    path = tmp_path / "runs" / "m128" / "spectra.parquet"
    df = pd.read_parquet(path)
    df.loc[df["bucket"] == "tail", ["soft_rank", "hard_rank"]] = math.nan
    df.to_parquet(path, index=False)
    fits = analyze(tmp_path, n_resamples=200).fits.set_index(["site", "bucket", "metric"])
    tail = fits.loc[("post", "tail", "hard_rank")]
    assert not tail["fittable"] and "1 run(s) with NaN ranks" in tail["reason"]
    assert fits.loc[("post", "all", "hard_rank"), "fittable"]


@pytest.mark.parametrize("key, value", [("rope_base", 500.0), ("vocab_size", 1024), ("seq_len", 64)])
def test_mixed_incompatible_configs_is_a_clear_error(tmp_path, key, value):
    rng = np.random.default_rng(5)
    for w in (32, 64, 128):
        planted_run(tmp_path / "runs" / f"m{w}", MUON, w, 0, rng)
    cfg_path = tmp_path / "runs" / "m64" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"][key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleRunsError, match=rf"mixed incompatible configs.*\['{key}'\].*{value} in 'm64'"):
        load_sweep(tmp_path)


def test_one_label_with_two_optimizer_settings_is_an_error(tmp_path):
    rng = np.random.default_rng(6)
    for w in (32, 64, 128):
        planted_run(tmp_path / "runs" / f"d{w}", DION, w, 0, rng)
    cfg_path = tmp_path / "runs" / "d64" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["optimizer"]["params"]["rank_fraction"] = 0.5
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleRunsError, match=r"label 'dion_r1_16' names different.*params\.rank_fraction"):
        load_sweep(tmp_path)


def test_records_logged_again_after_a_resume_keep_the_latest(tmp_path):
    rng = np.random.default_rng(7)
    run = planted_run(tmp_path / "r", MUON, 32, 0, rng)
    spectra = pd.read_parquet(run / "spectra.parquet")
    last = spectra[spectra["step"] == spectra["step"].max()].assign(soft_rank=31.0)
    pd.concat([spectra, last]).to_parquet(run / "spectra.parquet", index=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 60, "loss": 3.0, "val_loss": 2.5}) + "\n")
    sweep = load_sweep(run)
    assert len(sweep.spectra) == len(spectra)
    assert (sweep.spectra[sweep.spectra["step"] == 60]["soft_rank"] == 31.0).all()
    assert sweep.runs["final_val_loss"].iloc[0] == 2.5
    assert sweep.metrics["step"].is_unique
