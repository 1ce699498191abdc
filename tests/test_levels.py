"""Level ratios of ranks between series (analysis.levels) and the β-difference interval (analysis.compare)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from capscale.analysis import beta_difference, level_ratios
from capscale.spectrum import fit_power_law

WIDTHS = (64, 128, 256, 512, 1024)


def _planted(level: dict[str, float], seeds=(0, 1, 2), noise=0.05, beta=0.3, loss=None, widths=WIDTHS, seed=0):
    """points/runs frames: hard rank = level · 10 · (w/64)^β · exp(noise), soft rank = 2 × hard."""
    rng = np.random.default_rng(seed)
    points, runs = [], []
    for series, lv in level.items():
        for w in widths:
            for s in seeds:
                rid = f"{series}_w{w}_s{s}"
                hard = lv * 10 * (w / 64) ** beta * math.exp(noise * rng.standard_normal())
                for bucket in ("all", "tail"):
                    points.append(
                        {"run_id": rid, "site": "post", "bucket": bucket, "hard_rank": hard, "soft_rank": 2 * hard}
                    )
                v = (loss or {}).get(series, 4.0) + 0.01 * rng.standard_normal()
                runs.append(
                    {
                        "run_id": rid,
                        "series": series,
                        "arch": "",
                        "width": w,
                        "seed": s,
                        "final_val_loss": v,
                        "final_val_loss_tail": v + 3,
                    }
                )
    return pd.DataFrame(points), pd.DataFrame(runs)


def _row(levels, bucket="all", metric="hard_rank"):
    r = levels[(levels["bucket"] == bucket) & (levels["metric"] == metric)]
    assert len(r) == 1
    return r.iloc[0]


def test_planted_ratio_is_recovered_with_an_interval_that_covers_it():
    points, runs = _planted({"adamw": 1.0, "muon": 2.4}, loss={"adamw": 4.9, "muon": 4.6})
    r = _row(level_ratios(points, runs))
    assert (r["series"], r["baseline"]) == ("muon", "adamw")  # oriented: higher over lower
    assert r["ratio_low"] < 2.4 < r["ratio_high"] and abs(r["ratio"] - 2.4) < 0.1
    assert r["resolved"] and r["every_width"] and r["n_widths"] == 5 and r["n_seeds"] == 3
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert r["loss_diff_low"] < -0.3 < r["loss_diff_high"] and r["loss_diff"] == pytest.approx(-0.3, abs=0.02)
    tail = _row(level_ratios(points, runs), bucket="tail")
    assert tail["loss_diff"] == pytest.approx(r["loss_diff"])  # the bucket's own loss (offset cancels)


def test_no_difference_is_not_resolved():
    points, runs = _planted({"a": 1.0, "b": 1.0}, noise=0.2, seed=3)
    r = _row(level_ratios(points, runs))
    assert r["ratio"] >= 1 and r["ratio_low"] < 1 < r["ratio_high"] and not r["resolved"]


def test_interval_matches_a_t_interval_over_widths():
    points, runs = _planted({"a": 1.0, "b": 3.0}, noise=0.1, seed=5)
    r = _row(level_ratios(points, runs, confidence=0.9))
    pts = points[points["bucket"] == "all"].merge(runs, on="run_id")
    logs = pts.assign(log=np.log(pts["hard_rank"])).groupby(["series", "width"])["log"].mean()
    d = (logs["b"] - logs["a"]).to_numpy()
    half = stats.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert math.log(r["ratio"]) == pytest.approx(d.mean())
    assert math.log(r["ratio_low"]) == pytest.approx(d.mean() - half)
    assert math.log(r["ratio_high"]) == pytest.approx(d.mean() + half)


def test_only_shared_widths_and_one_width_has_no_interval():
    points, runs = _planted({"a": 1.0, "b": 2.0})
    drop = runs[(runs["series"] == "b") & (runs["width"] > 128)]["run_id"]
    r = _row(level_ratios(points[~points["run_id"].isin(drop)], runs[~runs["run_id"].isin(drop)]))
    assert r["widths"] == [64, 128] and r["n_widths"] == 2
    one = runs[(runs["series"] == "b") & (runs["width"] > 64)]["run_id"]
    r = _row(level_ratios(points[~points["run_id"].isin(one)], runs[~runs["run_id"].isin(one)]))
    assert r["n_widths"] == 1 and math.isnan(r["ratio_low"]) and not r["resolved"]


def test_beta_difference_recovers_the_standard_errors_of_two_fits():
    rng = np.random.default_rng(1)
    w = np.repeat(np.array(WIDTHS, dtype=float), 3)
    fa = fit_power_law(w, 5 * w**0.3 * np.exp(0.1 * rng.standard_normal(len(w))))
    fb = fit_power_law(w[:9], 5 * w[:9] ** 0.8 * np.exp(0.2 * rng.standard_normal(9)))
    diff, lo, hi = beta_difference(
        (fb.beta, fb.ci_low, fb.ci_high, fb.n), (fa.beta, fa.ci_low, fa.ci_high, fa.n), confidence=0.95
    )
    se = math.hypot(fa.stderr, fb.stderr)
    df = se**4 / (fa.stderr**4 / (fa.n - 2) + fb.stderr**4 / (fb.n - 2))
    assert diff == pytest.approx(fb.beta - fa.beta)
    assert hi - diff == pytest.approx(stats.t.ppf(0.975, df) * se) and diff - lo == pytest.approx(hi - diff)
    assert lo > 0  # 0.8 vs 0.3 on 9 and 15 points: resolved
    _, lo, hi = beta_difference((fa.beta, fa.ci_low, fa.ci_high, fa.n), (fa.beta, fa.ci_low, fa.ci_high, fa.n))
    assert lo < 0 < hi
    assert math.isnan(beta_difference((0.5, math.nan, math.nan, 2), (fa.beta, fa.ci_low, fa.ci_high, fa.n))[1])


def test_welch_log_ratio_matches_scipys_welch_interval():
    from capscale.analysis.levels import welch_log_ratio

    rng = np.random.default_rng(7)
    a, b = np.log(2.4) + 0.1 * rng.standard_normal(3), 0.2 * rng.standard_normal(4)
    ratio, lo, hi = welch_log_ratio(a, b, 0.9)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    assert math.log(ratio) == pytest.approx(a.mean() - b.mean())
    assert (math.log(lo), math.log(hi)) == pytest.approx((ci.low, ci.high))
    assert math.isnan(welch_log_ratio(a[:1], b, 0.9)[1])  # one seed: no interval
