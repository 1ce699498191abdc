"""The minimum detectable difference a Holm-corrected verdict needs (``power.mde_holm``), and the
pooled estimate's MDE (normal quantiles, df = inf)."""

import math

import numpy as np
import pytest
from scipy import stats
from test_design_power import _contrasts, _study

from capscale.analysis.power import holm, mde, mde_holm, pooled


def test_mde_holm_gives_80_percent_power_to_survive_holm_as_the_only_effect():
    # m comparisons, one real effect of size mde_holm, the others null (normal, se = 1):
    # the share of studies in which the real one is resolved after Holm is the stated power
    m, alpha, n = 6, 0.05, 20_000
    d = mde_holm(1.0, math.inf, m, alpha)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (n, m))
    z[:, 0] += d
    p = 2 * stats.norm.sf(np.abs(z))
    resolved = np.array([holm(row)[0] < alpha for row in p])
    assert resolved.mean() == pytest.approx(0.8, abs=0.015)
    # the uncorrected MDE falls short of it under Holm
    z0 = rng.normal(0, 1, (n, m))
    z0[:, 0] += mde(1.0, math.inf, alpha)
    p0 = 2 * stats.norm.sf(np.abs(z0))
    assert np.mean([holm(row)[0] < alpha for row in p0]) < 0.6
    # one comparison: no correction
    assert mde_holm(0.3, 4.0, 1) == pytest.approx(mde(0.3, 4.0))
    assert math.isnan(mde_holm(0.3, 4.0, 0))


def test_pooled_estimate_states_its_mde_with_normal_quantiles():
    out = pooled([0.1, 0.2, 0.3], [0.1, 0.1, 0.1])
    se = 0.1 / math.sqrt(3)
    assert out["mde"] == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * se)


def test_cell_contrasts_state_the_mde_at_the_holm_level_of_their_family():
    runs, configs, points = _study(np.random.default_rng(3))
    _, out = _contrasts(runs, configs, points)
    row = out[(out.metric == "hard_rank")].iloc[0]
    m = int(row.family_size)
    assert m == 4  # 4 cells, one pair each
    assert row.mde_holm == pytest.approx(
        (stats.t.ppf(1 - 0.05 / (2 * m), row.df) + stats.t.ppf(0.8, row.df)) * row.se, rel=1e-9
    )
    spread = out["se"] > 0
    assert (out.loc[spread, "mde_holm"] > out.loc[spread, "mde"]).all()
    assert (out.loc[~spread, "mde_holm"] == 0).all()  # Δβ with soft = 3 × hard: no spread over seeds
