"""Power-law fits: the paper's published β from its published points, bootstrap, bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capscale.spectrum import bootstrap_power_law, fit_power_law

FIXTURES = Path(__file__).parent / "fixtures" / "paper_reference"


def _published():
    points = pd.read_csv(FIXTURES / "global_rank_points.csv")
    table = pd.read_csv(FIXTURES / "beta_table.csv")
    return points, table


def test_reproduces_published_beta_table():
    points, table = _published()
    assert len(table) == 10  # 5 optimizer settings × soft/hard
    for row in table.itertuples():
        pts = points[(points.optimizer_variant == row.optimizer_variant) & (points.metric == row.metric)]
        fit = fit_power_law(pts.ffn_hidden_dim, pts.value)
        assert fit.n == row.n_widths == 8
        assert round(fit.beta, 3) == round(row.beta, 3), row
        assert round(fit.ci_low, 3) == round(row.beta_lower, 3), row
        assert round(fit.ci_high, 3) == round(row.beta_upper, 3), row
        assert round(fit.r2, 3) == round(row.r_squared, 3), row
        assert fit.intercept == pytest.approx(row.intercept, abs=1e-6)


def test_exact_power_law_and_prediction():
    w = np.array([64, 128, 256, 512, 1024])
    fit = fit_power_law(w, 3.0 * w**0.7)
    assert fit.beta == pytest.approx(0.7, abs=1e-12)
    assert np.exp(fit.intercept) == pytest.approx(3.0, rel=1e-10)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(2048) == pytest.approx(3.0 * 2048**0.7, rel=1e-10)


def test_interval_widens_with_confidence_and_covers_truth():
    rng = np.random.default_rng(0)
    w = np.repeat([1, 2, 4, 8, 16], 4).astype(float)
    hits = 0
    for _ in range(200):
        v = 2.0 * w**0.5 * np.exp(rng.normal(0, 0.1, w.size))
        fit = fit_power_law(w, v)
        hits += fit.ci_low <= 0.5 <= fit.ci_high
    assert 0.90 <= hits / 200 <= 0.99  # nominal 95% coverage
    f90, f99 = fit_power_law(w, v, 0.90), fit_power_law(w, v, 0.99)
    assert f99.ci_high - f99.ci_low > f90.ci_high - f90.ci_low


def test_bootstrap_over_replicates():
    rng = np.random.default_rng(1)
    widths = np.repeat([128, 256, 512, 1024], 12)  # e.g. 12 layers per width
    values = 5.0 * widths**0.6 * np.exp(rng.normal(0, 0.2, widths.size))
    fit = bootstrap_power_law(widths, values, n_resamples=500, seed=3)
    assert fit.ci_low < fit.beta < fit.ci_high
    assert fit.n == 48 and fit.method == "bootstrap_percentile_median"
    medians = [np.median(values[widths == w]) for w in (128, 256, 512, 1024)]
    assert fit.beta == pytest.approx(fit_power_law([128, 256, 512, 1024], medians).beta)
    # reproducible with a seed; more noise → wider interval
    assert bootstrap_power_law(widths, values, n_resamples=500, seed=3) == fit
    noisy = 5.0 * widths**0.6 * np.exp(rng.normal(0, 0.8, widths.size))
    wide = bootstrap_power_law(widths, noisy, n_resamples=500, seed=3)
    assert wide.ci_high - wide.ci_low > fit.ci_high - fit.ci_low
    # the interval covers the true exponent at about the nominal rate
    hits = 0
    for i in range(100):
        v = 5.0 * widths**0.6 * np.exp(rng.normal(0, 0.2, widths.size))
        f = bootstrap_power_law(widths, v, n_resamples=400, seed=i)
        hits += f.ci_low < 0.6 < f.ci_high
    assert 85 <= hits <= 100


@pytest.mark.parametrize(
    "widths,values,match",
    [
        ([1, 2], [1, 2], "at least 3 distinct widths, got 2"),
        ([1, 1, 2, 2], [1, 2, 3, 4], "at least 3 distinct widths, got 2"),
        ([1, 2, 4], [1, 0, 3], "positive"),
        ([1, 2, 4], [1, -2, 3], "positive"),
        ([0, 2, 4], [1, 2, 3], "positive"),
        ([1, 2, 4], [1, np.nan, 3], "finite"),
        ([1, 2, 4], [1, 2], "3 widths for 2 values"),
    ],
)
def test_bad_fit_input(widths, values, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(widths, values)


def test_bootstrap_needs_replicates():
    with pytest.raises(ValueError, match="replicate"):
        bootstrap_power_law([1, 2, 4], [1, 2, 4])
    with pytest.raises(ValueError, match="aggregate"):
        bootstrap_power_law([1, 1, 2, 2, 4, 4], [1, 1, 2, 2, 4, 4], aggregate="max")
