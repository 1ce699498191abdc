"""capscale.analysis: loading run directories, the aggregation convention, and bad input."""

import json
import math
import re

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


# -- hostile input: the directory walk (issue 30, item 1) --------------------------------


def _three_runs(root, rng):
    return [planted_run(root / "grp" / f"m{w}", MUON, w, 0, rng) for w in (32, 64, 128)]


def test_a_symlink_loop_or_a_link_out_of_the_root_is_skipped_and_each_run_counted_once(tmp_path):
    rng = np.random.default_rng(11)
    root = tmp_path / "root"
    _three_runs(root, rng)
    outside = planted_run(tmp_path / "elsewhere" / "m256", MUON, 256, 0, rng)
    (root / "self").symlink_to(".")  # a loop
    (root / "grp" / "up").symlink_to("..")  # a loop through the parent
    (root / "usr").symlink_to(tmp_path / "elsewhere")  # out of the root
    (root / "again").symlink_to(root / "grp" / "m64")  # a run reached twice
    (root / "runlink").symlink_to(outside)  # a run directory outside the root
    sweep = load_sweep(root)
    assert sorted(sweep.runs["run_id"]) == ["grp/m128", "grp/m32", "grp/m64"]
    skipped = sweep.excluded[sweep.excluded["status"] == "skipped"].set_index("name")["reason"]
    assert set(skipped.index) == {"self", "up", "usr", "again", "runlink"}
    assert "outside the root" in skipped["usr"] and "outside the root" in skipped["runlink"]
    assert "inside the walk already" in skipped["self"] and "inside the walk already" in skipped["again"]


def test_a_sweeps_runs_folder_does_not_follow_links_out_of_the_root(tmp_path):
    rng = np.random.default_rng(12)
    for w in (32, 64, 128):
        planted_run(tmp_path / "sw" / "runs" / f"m{w}", MUON, w, 0, rng)
    (tmp_path / "sw" / "runs" / "ext").symlink_to(planted_run(tmp_path / "ext", MUON, 256, 0, rng))
    (tmp_path / "sw" / "runs" / "dup").symlink_to(tmp_path / "sw" / "runs" / "m32")
    sweep = load_sweep(tmp_path / "sw")
    assert sorted(sweep.runs["run_id"]) == ["m128", "m32", "m64"]
    assert set(sweep.excluded.loc[sweep.excluded["status"] == "skipped", "name"]) == {"ext", "dup"}


def test_a_config_json_that_is_a_directory_is_listed(tmp_path):
    rng = np.random.default_rng(13)
    _three_runs(tmp_path, rng)
    bad = tmp_path / "grp" / "bad"
    (bad / "config.json").mkdir(parents=True)
    sweep = load_sweep(tmp_path)
    reason = sweep.excluded.set_index("run_id").loc["grp/bad", "reason"]
    assert "config.json" in reason and len(sweep.runs) == 3


# -- degenerate intervals never resolve a question (issue 30, item 2) ----------------------


def _equal_ratio_sweep(root):
    """Soft rank twice the hard rank at every width, up to round-off (a tilt of 3e-15 in the exponent):
    Δβ ≈ 3e-15 with a t-interval of that order, which lies above 0 and means nothing."""
    write_sweep(root, series=(MUON,), widths=(32, 64, 128), n_layer=2, n_logged=3)
    for part in root.glob("runs/*/spectra.parquet"):
        df = pd.read_parquet(part)
        df["soft_rank"] = 2.0 * df["hard_rank"] * df["dim"] ** 3e-15
        df.to_parquet(part, index=False)
    return root


def test_resolves_needs_a_nondegenerate_interval_beyond_round_off():
    from capscale.analysis.fits import degenerate, resolves

    assert resolves(0.1, 0.3) and resolves(-0.3, -0.1) and not resolves(-0.1, 0.3)
    assert degenerate(1.60171294e-16, 1.60171355e-16)  # the t-interval of a zero-residual fit
    assert not resolves(1.60171294e-16, 1.60171355e-16)
    assert not resolves(0.5, 0.5) and not resolves(float("nan"), 1.0) and not resolves(None, 1.0)
    assert not resolves(1e-12, 0.2)  # a bound within round-off of the null does not exclude it
    assert resolves(2.0, 3.0, null=1.0) and not resolves(1.0 + 1e-12, 3.0, null=1.0)


def test_a_delta_beta_of_round_off_is_degenerate_and_not_resolved(tmp_path):
    a = analyze(_equal_ratio_sweep(tmp_path), n_resamples=200)
    delta = a.fits[(a.fits["metric"] == "delta_beta") & (a.fits["bucket"] == "all")]
    assert delta["fittable"].all() and delta["degenerate"].all()
    assert (delta["beta"].abs() < 1e-12).all()
    soft = a.fits[a.fits["metric"] == "soft_rank"]
    assert not soft["degenerate"].any()  # real fits keep their intervals


def test_the_report_does_not_call_round_off_a_resolved_asymmetry(tmp_path):
    from capscale.report import build_report

    files = build_report(_equal_ratio_sweep(tmp_path), n_resamples=100)
    q3 = next(a for a in json.loads(files.json.read_text())["answers"] if a["id"] == "q3")
    assert q3["verdict"] != "resolved", q3["finding"]


# -- one bad run never stops the analysis: the bad-input table (issue 30, item 3) ----------------


def _parts(run, frames):
    """Replace the run's spectra file by a dataset of these part frames."""
    from capscale.rundir import write_spectra_part

    (run / "spectra.parquet").unlink()
    for frame in frames:
        write_spectra_part(run / "spectra.parquet", frame)


def _spectra(run, **cols):
    df = pd.read_parquet(run / "spectra.parquet")
    for name, value in cols.items():
        df[name] = value(df) if callable(value) else value
    df.to_parquet(run / "spectra.parquet", index=False)


def _config(run, section, key, value):
    cfg = json.loads((run / "config.json").read_text())
    if key is None:
        cfg[section] = value
    else:
        cfg[section][key] = value
    (run / "config.json").write_text(json.dumps(cfg))


def _metrics_step(run, value):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["step"] = value
    lines[1] = json.dumps(rec)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _string_hard_rank_in_a_part(run):
    df = pd.read_parquet(run / "spectra.parquet")
    first, second = df[df.step == df.step.min()], df[df.step != df.step.min()].copy()
    second["hard_rank"] = second["hard_rank"].astype(str)
    _parts(run, [first, second])


BAD_RUNS = {
    "string hard_rank in a part": (
        _string_hard_rank_in_a_part,
        r"spectra.parquet/part-00000001-\S+: column 'hard_rank' must hold numbers, holds (large_)?string",
    ),
    "string soft_rank": (
        lambda r: _spectra(r, soft_rank=lambda d: d.soft_rank.astype(str)),
        "column 'soft_rank' must hold numbers",
    ),
    "string dim": (
        lambda r: _spectra(r, dim=lambda d: d.dim.astype(str)),
        "column 'dim' must hold integers, holds (large_)?string",
    ),
    "integer site": (lambda r: _spectra(r, site=1), "column 'site' must hold strings, holds int64"),
    "string step": (lambda r: _spectra(r, step=lambda d: d.step.astype(str)), "column 'step' must hold integers"),
    "float layer": (
        lambda r: _spectra(r, layer=lambda d: d.layer + 0.5),
        "column 'layer' must hold integers, holds double",
    ),
    "string samples_per_dim": (
        lambda r: _spectra(r, samples_per_dim="many"),
        "column 'samples_per_dim' must hold numbers",
    ),
    "negative ranks": (
        lambda r: _spectra(r, hard_rank=lambda d: -d.hard_rank),
        r"column 'hard_rank' must be a number >= 0 or NaN, got -",
    ),
    "infinite rank": (
        lambda r: _spectra(r, soft_rank=float("inf")),
        "column 'soft_rank' must be a number >= 0 or NaN, got inf",
    ),
    "string batch_size": (
        lambda r: _config(r, "train", "batch_size", "8"),
        "config.json: train.batch_size must be an integer >= 1, got '8'",
    ),
    "string seq_len": (
        lambda r: _config(r, "model", "seq_len", "128"),
        "config.json: model.seq_len must be an integer >= 1, got '128'",
    ),
    "model a list": (
        lambda r: _config(r, "model", None, [1, 2]),
        r"config.json: model must be a JSON object, got \[1, 2\]",
    ),
    "seed 1e30": (
        lambda r: _config(r, "train", "seed", 1e30),
        "config.json: train.seed must be an integer >= 0 and <= 2\\*\\*63 - 1, got 1e\\+30",
    ),
    "seed 10**30": (lambda r: _config(r, "train", "seed", 10**30), "train.seed must be an integer >= 0 and <= 2"),
    "float ffn_width": (
        lambda r: _config(r, "model", "ffn_width", 256.0),
        "model.ffn_width must be an integer >= 1, got 256.0",
    ),
    "string metrics step": (
        lambda r: _metrics_step(r, "x"),
        "metrics.jsonl record 2: 'step' must be an integer >= 0, got 'x'",
    ),
    "float metrics step": (
        lambda r: _metrics_step(r, 10.5),
        "metrics.jsonl record 2: 'step' must be an integer >= 0, got 10.5",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_one_invalid_run_is_excluded_naming_file_field_and_value(tmp_path, case):
    mutate, message = BAD_RUNS[case]
    rng = np.random.default_rng(21)
    for w in (32, 64, 128):
        planted_run(tmp_path / "runs" / f"m{w}", MUON, w, 0, rng)
    bad = planted_run(tmp_path / "runs" / "bad", MUON, 256, 0, rng)
    mutate(bad)
    sweep = load_sweep(tmp_path)
    assert sorted(sweep.runs["run_id"]) == ["m128", "m32", "m64"]
    reason = sweep.excluded.set_index("run_id").loc["bad", "reason"]
    assert re.search(message, reason), reason
    assert "\n" not in reason


def test_a_sweep_json_that_is_no_object_is_listed_and_the_runs_analysed(tmp_path):
    write_sweep(tmp_path, series=(MUON,), widths=(32, 64, 128))
    (tmp_path / "sweep.json").write_text("[1]")
    sweep = load_sweep(tmp_path)
    assert len(sweep.runs) == 6 and sweep.spec is None
    reason = sweep.excluded.set_index("name").loc["sweep.json", "reason"]
    assert "must hold a JSON object, not list" in reason


def test_a_damaged_spectra_part_is_named_and_the_other_windows_analysed(tmp_path):
    # issue 30, item 10: "Parquet magic bytes not found" dropped the whole run without naming the part
    rng = np.random.default_rng(22)
    runs = [planted_run(tmp_path / "runs" / f"m{w}", MUON, w, 0, rng) for w in (32, 64, 128)]
    df = pd.read_parquet(runs[0] / "spectra.parquet")
    _parts(runs[0], [g for _, g in df.groupby("step")])
    parts = sorted((runs[0] / "spectra.parquet").iterdir())
    parts[2].write_bytes(b"not parquet at all")
    sweep = load_sweep(tmp_path)
    assert sorted(sweep.runs["run_id"]) == ["m128", "m32", "m64"]
    steps = sorted(sweep.spectra.loc[sweep.spectra.run_id == "m32", "step"].unique())
    assert steps == sorted(set(df.step) - {sorted(df.step.unique())[2]})
    damaged = sweep.excluded[sweep.excluded.status == "damaged"]
    assert list(damaged["run_id"]) == [f"m32/spectra.parquet/{parts[2].name}"]
    assert "damaged spectra part" in damaged["reason"].iloc[0]


def test_beta_difference_of_a_missing_interval_is_nan_not_a_type_error():
    # constant ranks: the report's JSON carries a degenerate fit's NaN bounds as None
    from capscale.analysis import beta_difference

    diff, lo, hi = beta_difference((0.0, None, None, 6), (0.5, 0.4, 0.6, 6))
    assert diff == -0.5 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in beta_difference((None, None, None, None), (0.5, 0.4, 0.6, 6)))
