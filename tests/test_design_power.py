"""Study designs: factors, cells, within-cell contrasts with Holm, power statements (analysis-level simulation)."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from capscale.analysis.contrasts import cell_contrasts, pooled_contrasts, seed_betas
from capscale.analysis.design import DuplicateRunsError, design_of
from capscale.analysis.power import holm, mde, welch

WIDTHS = (32, 64, 128, 256)


def _config(label, d_model, steps, seed, width, **top):
    return {
        "name": f"{label}_{d_model}_{steps}_{seed}_{width}",
        "model": {"d_model": d_model, "ffn_width": width, "n_layer": 2},
        "optimizer": {"name": label, "label": label},
        "train": {"steps": steps, "seed": seed},
        "versions": {"torch": "x"},
        **top,
    }


def _study(rng, effect_cell=None, effect=0.0, seeds=(0, 1, 2), noise=0.05):
    """A 2 (optimizer) × 2 (d_model) × 2 (steps) design as (runs, configs, points): β_hard 0.3 everywhere,
    plus ``effect`` for muon in ``effect_cell`` = (d_model, steps); per-seed noise on β and per-run noise on log R."""
    runs, configs, points = [], {}, []
    for label, d_model, steps in itertools.product(("adamw", "muon"), (32, 64), (100, 400)):
        for seed in seeds:
            beta = 0.3 + (effect if label == "muon" and (d_model, steps) == effect_cell else 0.0)
            beta += rng.normal(0, noise)
            for w in WIDTHS:
                run_id = f"{label}_d{d_model}_t{steps}_s{seed}_w{w}"
                configs[run_id] = _config(label, d_model, steps, seed, w)
                runs.append(
                    dict(run_id=run_id, label=label, optimizer=label, width=w, seed=seed, steps=steps, d_model=d_model)
                )
                hard = math.exp(1.0 + beta * math.log(w) + rng.normal(0, noise))
                points.append(dict(run_id=run_id, site="post", bucket="all", hard_rank=hard, soft_rank=3 * hard))
    runs = pd.DataFrame(runs)
    # the loader's series key (runs.py): label, step budget where it varies, and the varying arch axes
    runs["series"] = [f"{r.label} · {r.steps} steps · d_model={r.d_model}" for r in runs.itertuples()]
    runs["path"] = ""
    return runs, configs, pd.DataFrame(points)


def _contrasts(runs, configs, points):
    design, runs = design_of(runs, configs)
    return design, cell_contrasts(seed_betas(points, runs))


def test_design_finds_factors_cells_and_the_treatment():
    runs, configs, points = _study(np.random.default_rng(0))
    design, out = _contrasts(runs, configs, points)
    assert design.factors == ("model.d_model", "train.steps")
    assert len(design.cells) == 4 and all(t == ["adamw", "muon"] for t in design.cells["treatments"])
    hard = out[out["metric"] == "hard_rank"]
    assert len(hard) == 4 and set(hard["family_size"]) == {4}  # one comparison per cell, Holm over the 4


def test_planted_effect_is_found_in_its_cell_only():
    runs, configs, points = _study(np.random.default_rng(1), effect_cell=(64, 400), effect=0.4)
    _, out = _contrasts(runs, configs, points)
    hard = out[out["metric"] == "hard_rank"].set_index("cell")
    assert hard["resolved"].sum() == 1
    assert hard.loc["d_model=64 · 400 steps", "resolved"]
    assert hard.loc["d_model=64 · 400 steps", "low"] > 0.2
    # the pooled estimate is stated with its heterogeneity, which the planted cell makes large
    pool = pooled_contrasts(out).set_index("metric").loc["hard_rank"]
    assert pool["n_cells"] == 4 and pool["i2"] > 0.5


def test_without_an_effect_resolved_verdicts_stay_near_the_nominal_rate():
    rng = np.random.default_rng(2)
    runs, configs, points = _study(rng)
    _, runs = design_of(runs, configs)
    betas = seed_betas(points, runs)
    betas = betas[betas["metric"] == "hard_rank"].reset_index(drop=True)
    resolved = 0
    for _ in range(100):  # 100 studies of one design, simulated at the level of the per-seed β
        betas["beta"] = 0.3 + rng.normal(0, 0.05, len(betas))
        resolved += bool(cell_contrasts(betas)["resolved"].any())
    # family-wise error ≤ 5% by Holm; P(X > 11 | Binomial(100, 0.05)) < 0.5%
    assert resolved <= 11, resolved
    # uncorrected, one of 4 cells at 5% would be "resolved" in ~19% of studies: the correction is what holds it
    raw = sum(
        bool((cell_contrasts(betas.assign(beta=0.3 + rng.normal(0, 0.05, len(betas))))["p"] < 0.05).any())
        for _ in range(100)
    )
    assert raw > resolved


def test_flat_top_level_lr_splits_the_series():
    runs, configs, points = _study(np.random.default_rng(3), seeds=(0,))
    for run_id, cfg in configs.items():
        cfg["lr"] = 3e-3 if "adamw" in run_id else 0.02
    rows = runs[runs["label"] == "adamw"].copy()
    rows["run_id"] = rows["run_id"] + "_lr"
    for run_id in rows["run_id"]:
        configs[run_id] = {**configs[run_id[:-3]], "lr": 1e-3}
    runs = pd.concat([runs, rows], ignore_index=True)
    design, split = design_of(runs, configs)
    assert "lr" in design.factors  # varies within adamw: a cell factor
    assert {"adamw · 100 steps · d_model=32 · lr=0.001", "adamw · 100 steps · d_model=32 · lr=0.003"} <= set(
        split["series"]
    )
    assert not split.duplicated(["series", "width", "seed"]).any()


def test_duplicate_seeds_are_refused_with_one_line_naming_them():
    runs, configs, _ = _study(np.random.default_rng(4), seeds=(0,))
    dup = runs.iloc[[0]].assign(run_id="copy_of_first")
    configs["copy_of_first"] = configs[runs["run_id"].iloc[0]]
    with pytest.raises(DuplicateRunsError) as err:
        design_of(pd.concat([runs, dup], ignore_index=True), configs)
    msg = str(err.value)
    assert "\n" not in msg and "copy_of_first" in msg and runs["run_id"].iloc[0] in msg


def test_one_seed_gives_no_interval_over_seeds():
    runs, configs, points = _study(np.random.default_rng(5), seeds=(0,))
    _, out = _contrasts(runs, configs, points)
    assert out["low"].isna().all() and out["mde"].isna().all() and not out["resolved"].any()
    assert all("no interval over seeds" in n for n in out["note"])


def test_welch_mde_and_holm_match_their_definitions():
    d = welch([0.1, 0.2, 0.3], [0.5, 0.7, 0.6])
    ref = stats.ttest_ind([0.5, 0.7, 0.6], [0.1, 0.2, 0.3], equal_var=False)
    assert d.diff == pytest.approx(0.4) and d.p == pytest.approx(ref.pvalue)
    assert d.excluded_above == d.high and d.low < 0.4 < d.high
    # at the MDE a true difference is detected with 80% power: the t quantiles add up
    assert mde(1.0, 1e9) == pytest.approx(1.959964 + 0.841621, rel=1e-5)
    assert holm([0.01, 0.04, 0.03, float("nan")]) == pytest.approx([0.03, 0.06, 0.06, float("nan")], nan_ok=True)


def test_config_dump_is_plain_json():
    runs, configs, _ = _study(np.random.default_rng(6), seeds=(0,))
    design, _ = design_of(runs, configs)
    json.dumps(design.to_dict())


def test_a_telemetry_window_sized_per_width_is_no_factor():
    runs, configs, _ = _study(np.random.default_rng(7), seeds=(0,))
    for cfg in configs.values():
        cfg["telemetry"] = {"window": cfg["model"]["ffn_width"] // 8, "every": 10}
    design, split = design_of(runs, configs)
    assert "telemetry.window" not in design.factors and design.measurement == ("telemetry.window",)
    assert len(design.cells) == 4 and split["series"].nunique() == 8


def test_power_clause_states_the_mde_at_the_holm_level_and_what_the_data_exclude():
    from capscale.report.verdicts import power_clause

    rows = [
        {
            "a": "adamw",
            "b": "muon",
            "low": -0.2,
            "high": 0.6,
            "mde": 0.45,
            "mde_holm": 0.62,
            "reference": 0.53,
            "excludes_reference": False,
        },
        {
            "a": "adamw",
            "b": "muon",
            "low": -0.1,
            "high": 0.3,
            "mde": 0.25,
            "mde_holm": 0.35,
            "reference": 0.53,
            "excludes_reference": True,
        },
    ]
    text = power_clause(rows)
    assert "minimum detectable Δβ_hard at 80% power 0.25–0.45 (0.35–0.62 at Holm's α/m)" in text
    assert "the data exclude |Δβ_hard| beyond 0.30–0.60" in text
    assert "the paper's gap 0.53 is excluded in 1 of 2" in text
    # a report.json written before mde_holm existed still reads
    old = [{k: v for k, v in r.items() if k != "mde_holm"} for r in rows]
    assert "Holm" not in power_clause(old)
    alone = [{**r, "mde_holm": r["mde"]} for r in rows]  # a family of one: the same level, said once
    assert "Holm" not in power_clause(alone)
