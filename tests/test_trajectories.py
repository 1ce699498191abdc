"""β over training: planted runs whose exponents change over training in a known way."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import DEFAULT_SERIES, Series, config, planted_run, spectra_row, write_run

from capscale.analysis import FitOptions, load_sweep
from capscale.analysis.trajectories import (
    beta_trajectories,
    pair_trajectories,
    separation,
    series_pairs,
    shared_steps,
)

W0, WIDTHS, STEPS = 32, (32, 64, 128, 256), (0, 10, 20, 30, 40, 50, 60)
SOFT_OVER_HARD = 3.0  # soft anchor / hard anchor: the level ratio of soft to hard at W0


def beta_adamw(step):
    return 0.3


def beta_muon(step):
    return 0.3 if step <= 20 else 0.8  # the exponents part after step 20


def _write(root, betas, *, seeds=(0, 1, 2), anchors=None, noise=0.01, drop=None, rng_seed=0):
    """Runs with hard rank = a·W0·(w/W0)^β(step) and soft rank = 3·a·W0·(w/W0)^(β(step)/2 + 0.4)."""
    rng = np.random.default_rng(rng_seed)
    anchors = anchors or {}
    for label, beta in betas.items():
        series = Series(label, 0.3, 0.1, {}, {}, loss0=4.0, steps=60)
        a = anchors.get(label, 0.1)
        for width in WIDTHS:
            for seed in seeds:
                name = f"{label}_w{width}_s{seed}"
                rows = []
                for step in STEPS:
                    if drop == (name, step):
                        continue
                    for layer in range(2):
                        for site in ("pre", "post"):
                            for bucket in ("all", "head", "mid", "tail"):
                                b = beta(step)
                                hard = a * W0 * (width / W0) ** b * math.exp(rng.normal(0, noise))
                                soft = SOFT_OVER_HARD * a * W0 * (width / W0) ** (b / 2 + 0.4)
                                soft *= math.exp(rng.normal(0, noise))
                                rows.append(spectra_row(step, layer, site, bucket, soft, hard, width, 4096))
                metrics = [{"step": 60, "loss": 4.0, "val_loss": 4.0}]
                write_run(root / "runs" / name, config(name, series, width, seed), rows, metrics)
    return load_sweep(root)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("traj"), {"adamw": beta_adamw, "muon": beta_muon}, anchors={"muon": 0.2})


@pytest.fixture(scope="module")
def traj(planted):
    return beta_trajectories(planted.spectra, planted.runs, FitOptions(n_resamples=200))


def test_beta_is_recovered_at_every_step_with_its_interval(traj):
    hard = traj[traj["metric"] == "hard_rank"]
    assert set(hard["step"]) == set(STEPS)
    assert len(hard) == 2 * len(STEPS) * 2 * 4  # series × steps × sites × buckets
    planted = np.where(hard["series"] == "muon", hard["step"].map(beta_muon), hard["step"].map(beta_adamw))
    assert np.abs(hard["beta"] - planted).max() < 0.03
    # 95% intervals: most contain the planted β (112 fits; a few misses are expected)
    assert ((hard["ci_low"] <= planted) & (planted <= hard["ci_high"])).mean() > 0.85
    assert (hard["ci_high"] - hard["ci_low"]).max() < 0.1
    assert (hard["n_widths"] == 4).all() and (hard["n_seeds"] == 3).all() and (hard["n_low_nd"] == 0).all()
    assert (hard["boot_over"] == "seeds").all()
    soft = traj[(traj["metric"] == "soft_rank") & (traj["series"] == "muon")]
    for _, r in soft.iterrows():
        assert r["beta"] == pytest.approx(beta_muon(r["step"]) / 2 + 0.4, abs=0.03)
    delta = traj[(traj["metric"] == "delta_beta") & (traj["series"] == "muon") & (traj["step"] == 60)]
    assert delta["beta"].to_numpy() == pytest.approx(0.4 - 0.8 / 2, abs=0.03)


def test_tokens_seen_are_steps_times_tokens_per_step(traj, planted):
    per_step = 8 * 32  # batch_size × seq_len of the synthetic configs
    assert (planted.runs["tokens_per_step"] == per_step).all()
    assert (traj["tokens"] == traj["step"] * per_step).all()


def test_only_steps_every_run_of_the_series_has_are_fitted(tmp_path):
    sweep = _write(tmp_path, {"adamw": beta_adamw}, seeds=(0,), drop=("adamw_w64_s0", 30))
    assert shared_steps(sweep.spectra, sweep.runs) == {"adamw": [s for s in STEPS if s != 30]}
    traj = beta_trajectories(sweep.spectra, sweep.runs, FitOptions(n_resamples=200))
    assert 30 not in set(traj["step"]) and set(traj["step"]) == set(STEPS) - {30}


def test_pair_difference_and_level_ratio_follow_the_planted_change(planted):
    pairs = series_pairs(planted.runs)
    assert pairs == [("muon", "adamw")]
    pt = pair_trajectories(planted.spectra, planted.runs, pairs)
    hard = pt[(pt["metric"] == "hard") & (pt["site"] == "post") & (pt["bucket"] == "all")].set_index("step")
    logs = np.log(np.array(WIDTHS) / W0)
    for step, r in hard.iterrows():
        d = beta_muon(step) - beta_adamw(step)
        assert r["dbeta"] == pytest.approx(d, abs=0.03) and r["dbeta_high"] - r["dbeta_low"] < 0.1
        # median over seeds of muon / adamw at each width, geometric mean over the 4 widths
        expected = 2.0 * math.exp(d * logs.mean())
        assert r["ratio"] == pytest.approx(expected, rel=0.03)
        assert r["ratio_widths"] == list(WIDTHS)
    # before the change the slopes agree (0 inside the interval); after it they differ
    assert hard.loc[10, "dbeta_low"] < 0 < hard.loc[10, "dbeta_high"]
    assert hard.loc[40, "dbeta_low"] > 0.4


def test_separation_finds_when_the_intervals_part(traj, planted):
    sep = separation(traj, [("muon", "adamw")]).iloc[0]
    assert sep["separated"] == [30, 40, 50, 60] and sep["first"] == 30
    assert sep["at_end"] and sep["higher"] == "muon" and sep["n_skipped"] == 0
    # the same exponents for the soft rank through step 20, then 0.8 vs 0.55: also parts at 30
    soft = separation(traj, [("muon", "adamw")], metric="soft_rank").iloc[0]
    assert soft["first"] == 30


def test_separation_skips_undersampled_steps(traj):
    marked = traj.copy()
    marked.loc[(marked["series"] == "muon") & (marked["step"] == 60), "n_low_nd"] = 1
    sep = separation(marked, [("muon", "adamw")]).iloc[0]
    assert sep["separated"] == [30, 40, 50] and sep["n_skipped"] == 1 and sep["last"] == 50


def test_series_pairs_pair_with_the_baseline_within_arch_and_budget():
    runs = pd.DataFrame(
        {
            "series": ["adamw", "muon", "dion", "adamw · nope", "muon · nope", "adamw · 1200"],
            "label": ["adamw", "muon", "dion", "adamw", "muon", "adamw"],
            "arch": ["", "", "", "pos=none", "pos=none", ""],
            "steps": [600, 600, 600, 600, 600, 1200],
        }
    )
    assert series_pairs(runs) == [("dion", "adamw"), ("muon", "adamw"), ("muon · nope", "adamw · nope")]
    no_base = runs[runs["label"] != "adamw"]
    assert series_pairs(no_base) == [("dion", "muon")]


def test_report_states_when_the_exponents_separate(planted, tmp_path):
    from capscale.report import build_report

    files = build_report(planted.root, tmp_path / "report", n_resamples=200)
    data = json.loads(files.json.read_text())
    bt = data["beta_trajectory"]
    hard = [f for f in bt["fits"] if f["metric"] == "hard_rank" and f["site"] == "post" and f["bucket"] == "all"]
    assert {(f["series"], f["step"]) for f in hard} == {(s, t) for s in ("adamw", "muon") for t in STEPS}
    assert {p["step"] for p in bt["pairs"]} == set(STEPS)
    sentences = [s["sentence"] for s in bt["separation"]]
    assert any(
        "muon vs adamw, β_hard" in s and "separate from step 30 (7,680 tokens) on, through step 60" in s
        for s in sentences
    )
    assert files.figures["beta_trajectory"].read_bytes().startswith(b"\x89PNG")
    page = files.html.read_text()
    assert 'id="beta-trajectory"' in page or "β over training" in page
    assert "separate from step 30" in files.markdown.read_text()


def test_d_model_is_an_architecture_axis_and_pairs_stay_within_it(tmp_path):
    rng = np.random.default_rng(3)
    for d_model in (32, 64):
        for s in (DEFAULT_SERIES[0], DEFAULT_SERIES[2]):  # AdamW and Muon, 60 steps
            for k in (1, 2, 4):
                name = f"{s.label}_w{k * d_model}_d{d_model}"
                planted_run(tmp_path / "runs" / name, s, k * d_model, 0, rng, widths=(32, 256), d_model=d_model)
    sweep = load_sweep(tmp_path)
    assert sweep.arch_axes == ("d_model",)
    assert series_pairs(sweep.runs) == [
        ("muon · d_model=32", "adamw · d_model=32"),
        ("muon · d_model=64", "adamw · d_model=64"),
    ]


def test_the_trajectory_figure_has_a_row_per_compared_cell(tmp_path):
    """One row (β_soft, β_hard) per architecture and budget, each holding that cell's optimizers."""
    from capscale.analysis import analyze
    from capscale.report.figures import fig_beta_trajectory

    rng = np.random.default_rng(4)
    for d_model in (32, 64):
        for s in (DEFAULT_SERIES[0], DEFAULT_SERIES[2]):
            for k in (1, 2, 4):
                name = f"{s.label}_w{k * d_model}_d{d_model}"
                planted_run(tmp_path / "runs" / name, s, k * d_model, 0, rng, widths=(32, 256), d_model=d_model)
    fig = fig_beta_trajectory(analyze(tmp_path, n_resamples=100))
    axes = fig.get_axes()
    assert len(axes) == 4
    titles = [ax.get_title() for ax in axes]
    assert all("d_model=32" in t for t in titles[:2]) and all("d_model=64" in t for t in titles[2:])
    for ax in axes:
        assert sorted(line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")) == [
            "adamw",
            "muon",
        ]
