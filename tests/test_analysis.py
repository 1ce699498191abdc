"""capscale.analysis on a synthetic sweep with planted power laws: β recovered, pairs found, phases placed."""

import math

import numpy as np
import pandas as pd
import pytest
from synthetic_runs import DEFAULT_SERIES, WIDTHS, write_sweep, write_unfinished

from capscale.analysis import IncompatibleRunsError, PhaseThresholds, analyze, classify, run_keys

N_RESAMPLES = 400  # enough for stable intervals; keeps the suite fast


def _planted(series_name: str):
    """Map an analysis series name back to its planted ``Series``."""
    for s in DEFAULT_SERIES:
        setting = f"{s.label} · {s.steps} steps" if s.label == "adamw" else s.label
        if series_name == f"{setting} · pos={s.pos}":
            return s
    raise KeyError(series_name)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    root = write_sweep(tmp_path_factory.mktemp("sweep"))
    write_unfinished(root, DEFAULT_SERIES[2], 512, "diverged", "loss is NaN at step 10")
    write_unfinished(root, DEFAULT_SERIES[3], 512, "running", None)
    return analyze(root, n_resamples=N_RESAMPLES)


def test_runs_series_and_exclusions(analysis):
    runs, excluded = analysis.sweep.runs, analysis.sweep.excluded
    assert len(runs) == sum(len(s.seeds) for s in DEFAULT_SERIES) * len(WIDTHS)
    assert analysis.sweep.arch_axes == ("pos",)  # pos varies → part of the series key; activation does not
    assert set(runs["series"]) == {
        "adamw · 60 steps · pos=rope",
        "adamw · 120 steps · pos=rope",
        "muon · pos=rope",
        "dion_r1_16 · pos=rope",
        "adamw · 60 steps · pos=none",
        "muon · pos=none",
    }
    assert dict(zip(excluded["status"], excluded["reason"])) == {
        "diverged": "diverged: loss is NaN at step 10",
        "running": "running (unfinished)",
    }
    assert set(excluded["width"]) == {512}  # recorded with what the config says, left out of every fit
    assert 512 not in set(analysis.points.merge(runs, on="run_id")["width"])


def test_run_keys_from_configs_alone_name_series_as_the_sweep_does(analysis):
    """Series keys from configs only (no telemetry read) equal load_sweep's, and depend on the set of runs."""
    import json
    from pathlib import Path

    runs = analysis.sweep.runs
    configs = {r: json.loads((Path(p) / "config.json").read_text()) for r, p in zip(runs.run_id, runs.path)}
    keys = run_keys(configs)
    cols = ["run_id", "series", "width", "seed"]
    pd.testing.assert_frame_equal(keys[cols], runs[cols])
    # Without the no-position runs, pos no longer varies and leaves the key; one budget per label drops steps.
    rope_60 = {r: c for r, c in configs.items() if c["model"]["pos"] == "rope" and c["train"]["steps"] == 60}
    assert set(run_keys(rope_60).series) == {"adamw", "muon", "dion_r1_16"}
    bad = dict(configs)
    first = next(iter(bad))
    bad[first] = {**bad[first], "model": {**bad[first]["model"], "seq_len": 99}}
    with pytest.raises(IncompatibleRunsError, match="seq_len"):
        run_keys(bad)
    with pytest.raises(ValueError, match="at least one"):
        run_keys({})


def test_recovers_planted_betas(analysis):
    fits = analysis.fits[analysis.fits["metric"] != "delta_beta"]
    assert len(fits) == 6 * 2 * 4 * 2  # series × sites × buckets × (soft, hard)
    assert fits["fittable"].all()
    covered, boot_covered = [], []
    for r in fits.itertuples():
        truth = _planted(r.series).beta("soft" if r.metric == "soft_rank" else "hard", r.site, r.bucket)
        # planted noise: ~2.5% per run → SE(β) ≈ 0.01–0.02 over 3 octaves; 0.06 is ≈ 4 SE
        assert abs(r.beta - truth) < 0.06, (r.series, r.site, r.bucket, r.metric, r.beta, truth)
        covered.append(r.ci_low <= truth <= r.ci_high)
        boot_covered.append(r.boot_low <= truth <= r.boot_high)
    # 95% t-intervals: realised coverage over the 96 fits is near nominal (0.94–0.98 across planted draws;
    # binomial 1st percentile ≈ 0.89). The layer bootstrap is conservative here: layers differ systematically.
    assert np.mean(covered) >= 0.88
    assert np.mean(boot_covered) >= 0.9
    # n = runs (seeds as replicates); 2 seeds → bootstrap over layers (see fits.MIN_SEEDS_FOR_SEED_BOOTSTRAP)
    muon = fits[(fits["series"] == "muon · pos=rope")]
    assert set(muon["n"]) == {8} and set(muon["n_widths"]) == {4} and set(muon["boot_over"]) == {"layers"}


def test_delta_beta_is_soft_minus_hard(analysis):
    b = analysis.betas
    assert np.allclose(b["delta_beta"], b["soft_beta"] - b["hard_beta"], atol=1e-12)
    assert (b["delta_ci_low"] < b["delta_beta"]).all() and (b["delta_beta"] < b["delta_ci_high"]).all()


def test_matched_loss_finds_the_planted_pair(analysis):
    m = analysis.matched
    # AdamW at 2× steps and Dion 1/16 were planted 0.005 nats apart; every other pair ≥ 0.1 apart
    assert set(zip(m["series_a"], m["series_b"])) == {("adamw · 120 steps · pos=rope", "dion_r1_16 · pos=rope")}
    assert sorted(m["width"]) == list(WIDTHS)
    assert (m["loss_diff"].abs() <= 0.02).all()
    # planted β_hard 0.33 vs 0.50: same loss, different geometry
    assert set(m["geometry"]) == {"different"}
    assert (m["beta_hard_b"] > m["beta_hard_high_a"]).all()
    assert (m["hard_frac_tail_b"] > m["hard_frac_tail_a"]).all()
    assert (m["asymmetry_a"] > m["asymmetry_b"]).all()
    tight = analyze(analysis.sweep, n_resamples=N_RESAMPLES, tolerance=0.0001)
    assert tight.matched.empty


def test_phase_regions(analysis):
    regions = analysis.phase.groupby("series")["region"].agg(set).to_dict()
    assert regions["adamw · 60 steps · pos=rope"] == {"brittle"}
    assert regions["adamw · 120 steps · pos=rope"] == {"brittle"}
    assert regions["muon · pos=rope"] == {"broad"}
    assert regions["dion_r1_16 · pos=rope"] == {"compact"}


@pytest.mark.parametrize(
    "r1, r2, region",
    [
        (0.02, 0.01, "collapsed"),
        (0.4, 0.05, "brittle"),  # balance 0.125 < 0.25
        (0.2, 0.1, "compact"),
        (0.7, 0.4, "broad"),
        (0.7, 0.1, "brittle"),  # broad soft rank on a narrow hard rank
        (0.3, 0.31, "impossible"),
        (math.nan, 0.1, "unknown"),
    ],
)
def test_classify(r1, r2, region):
    assert classify(r1, r2) == region


def test_phase_thresholds_are_parameters(analysis):
    wide = analyze(analysis.sweep, n_resamples=N_RESAMPLES, broad_soft=0.2)
    assert set(wide.phase[wide.phase["series"] == "dion_r1_16 · pos=rope"]["region"]) == {"broad"}
    assert wide.params.phase == PhaseThresholds(broad_soft=0.2)
    with pytest.raises(ValueError, match="collapsed_soft < broad_soft"):
        PhaseThresholds(collapsed_soft=0.6)
    with pytest.raises(ValueError, match="unknown analysis parameter"):
        analyze(analysis.sweep, brittle=0.3)


def test_optimizer_vs_architecture(analysis):
    e = analysis.effects
    assert set(e[e["kind"] == "architecture"]["within"]) == {"adamw · 60 steps", "muon"}
    s = analysis.effect_summary.set_index("metric")
    assert s.loc["hard", "larger"] == "optimizer"  # planted: optimizer spans ≈ 0.5, architecture ≈ 0.05
    assert s.loc["hard", "optimizer_span"] > 5 * s.loc["hard", "architecture_span"]


def test_trajectories_and_bucket_capacity(analysis):
    tr = analysis.trajectories
    one = tr[(tr["run_id"] == "muon_w64_rope_t60_s0") & (tr["site"] == "post") & (tr["bucket"] == "all")]
    assert list(one["step"]) == [10, 20, 30, 40, 50, 60]
    assert one["soft_rank"].iloc[-1] > one["soft_rank"].iloc[0]  # planted growth over training
    b = analysis.buckets
    row = b[(b["run_id"] == "muon_w64_rope_t60_s0")].set_index("bucket")
    assert list(row.index) == ["head", "mid", "tail"]
    assert row.loc["tail", "val_loss"] - row.loc["head", "val_loss"] == pytest.approx(2.5)
    assert (row["hard_frac"] > 0).all()


def test_low_nd_flagged(analysis):
    low = analysis.low_nd
    # planted N: tail 512 samples → N/D < 10 from width 64 on; all-token 4096 → well sampled up to 256 (N/D = 16)
    assert set(low["bucket"]) <= {"head", "mid", "tail"}
    tail = low[(low["bucket"] == "tail")]
    assert set(tail["width"]) == {64, 128, 256}
    fits = analysis.fits
    assert (fits[(fits["bucket"] == "all")]["n_low_nd"] == 0).all()
    assert (fits[(fits["bucket"] == "tail") & (fits["series"] == "muon · pos=rope")]["n_low_nd"] == 6).all()


def test_seed_spread(analysis):
    sp = analysis.spread
    row = sp[
        (sp["series"] == "muon · pos=rope")
        & (sp["width"] == 64)
        & (sp["site"] == "post")
        & (sp["bucket"] == "all")
        & (sp["metric"] == "hard_rank")
    ].iloc[0]
    pts = analysis.points.merge(analysis.sweep.runs, on="run_id")
    vals = pts[
        (pts["series"] == "muon · pos=rope") & (pts["width"] == 64) & (pts["site"] == "post") & (pts["bucket"] == "all")
    ]["hard_rank"]
    assert row["n_seeds"] == 2
    assert (row["min"], row["median"], row["max"]) == (vals.min(), pd.Series(vals).median(), vals.max())


def test_spans_compare_betas_on_shared_widths():
    """A saturating curve fitted over ×1…×16 has a lower β than over ×1…×4: comparing that
    with a ×1…×4 arm would call curvature an architecture effect. Planted: the same law
    rank = w^0.5 up to w = 512, flat beyond, for both architectures of one optimizer."""
    from capscale.analysis.compare import optimizer_architecture, shared_widths

    law = {w: min(w, 512) ** 0.5 for w in (128, 256, 512, 1024, 2048)}
    runs, points = [], []
    for arch, widths in (("pos=rope", [128, 256, 512, 1024, 2048]), ("pos=none", [128, 256, 512])):
        for w in widths:
            rid = f"{arch}_{w}"
            runs.append({"run_id": rid, "width": w, "setting": "muon", "arch": arch, "series": f"muon · {arch}"})
            points.append(
                {"run_id": rid, "site": "post", "bucket": "all", "soft_rank": 2 * law[w], "hard_rank": law[w]}
            )
    betas = pd.DataFrame(
        [
            {
                "setting": "muon",
                "arch": a,
                "series": f"muon · {a}",
                "site": "post",
                "bucket": "all",
                **{
                    f"{m}_{f}": v
                    for m in ("soft", "hard", "delta")
                    for f, v in (("beta", 0.0), ("ci_low", 0.0), ("ci_high", 0.0), ("fittable", True))
                },
            }
            for a in ("pos=rope", "pos=none")
        ]
    )
    _, effects = optimizer_architecture(betas, pd.DataFrame(points), pd.DataFrame(runs))
    arch = effects[effects["kind"] == "architecture"].set_index("metric")
    assert list(arch.loc["hard", "widths"]) == [128, 256, 512]
    assert arch.loc["hard", "span"] == pytest.approx(0.0, abs=1e-12)
    assert arch.loc["hard", "beta_highest"] == pytest.approx(0.5)
    # on all widths the rope arm's β is far lower: the span would have been a fake effect
    all_widths = np.log([128, 256, 512, 1024, 2048])
    assert 0.5 - np.polyfit(all_widths, np.log([law[w] for w in law]), 1)[0] > 0.2

    assert shared_widths({"a": {1, 2, 4, 8}, "b": {1, 2, 4}, "c": {8, 16, 32}}) == (["a", "b"], [1, 2, 4])
    assert shared_widths({"a": {1, 2, 4}, "b": {2, 4, 8}}) == ([], [])
