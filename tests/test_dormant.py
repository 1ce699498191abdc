"""Dormant-unit fraction: from the covariance's diagonal, against planted dead units."""

import numpy as np
import pytest
import torch
from test_probe_sites import hf_gpt2

from capscale.probe import measure_model
from capscale.probe.records import COLUMNS, spectrum_row
from capscale.spectrum import DORMANT_REL_VARIANCE, StreamingCovariance, dormant_fraction, spectrum_summary
from capscale.spectrum._torch import Moments


def _planted(n=400, d=24, dead=(1, 5, 6, 17), faint=(9,), seed=0):
    """Rows with exactly-constant `dead` units, `faint` units at 1e-5 of the others' scale
    (dormant by the threshold) and one unit at 10 × the threshold (alive)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x[:, list(dead)] = 3.0  # constant: variance exactly 0
    x[:, list(faint)] *= 1e-5 / np.sqrt(d)
    x[:, 2] *= np.sqrt(10 * DORMANT_REL_VARIANCE)  # variance ≈ 1e-2 × 1: well above the threshold
    return x, len(dead) + len(faint)


def test_dormant_fraction_counts_planted_units_exactly():
    x, k = _planted()
    var = x.var(axis=0, ddof=1)
    assert dormant_fraction(var) == k / x.shape[1]
    # scale-free: the same units at any activation scale
    assert dormant_fraction(1e-9 * var) == k / x.shape[1]
    # the threshold is the parameter: at 1e-1 the unit at 1e-2 counts too
    assert dormant_fraction(var, rel=1e-1) == (k + 1) / x.shape[1]
    assert dormant_fraction(np.zeros(5)) == 1.0  # identical rows: every unit dormant
    with pytest.raises(ValueError, match="NaN"):
        dormant_fraction([1.0, np.nan])


def test_dormant_frac_in_summary_and_spectra_rows():
    x, k = _planted()
    d = x.shape[1]
    acc = StreamingCovariance(d).update(x)
    assert acc.summary()["dormant_frac"] == k / d
    # from the eigenvalues alone it is not defined: NaN, not a guess
    assert np.isnan(spectrum_summary(acc.eigenvalues(), acc.count)["dormant_frac"])
    assert np.isnan(spectrum_summary(None, 1, dim=d, variances=np.ones(d))["dormant_frac"])
    with pytest.raises(ValueError, match="unit variances"):
        spectrum_summary(acc.eigenvalues(), acc.count, variances=np.ones(d + 1))
    # the probe's rows, from a Moments (upper triangle only: the diagonal is in it)
    t = torch.from_numpy(x)
    mean = t.mean(0)
    scatter = torch.triu((t - mean).T @ (t - mean))
    row = spectrum_row(
        Moments(len(x), mean, scatter, upper=True), step=0, layer=0, site="pre", bucket="all", module="m"
    )
    assert "dormant_frac" in COLUMNS and row["dormant_frac"] == k / d
    zero = spectrum_row(
        Moments(5, torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)),
        step=0,
        layer=0,
        site="pre",
        bucket="all",
        module="m",
    )
    assert zero["spectrum_status"] == "zero_variance" and zero["dormant_frac"] == 1.0


def test_measured_model_reports_its_dead_ffn_units():
    """Killed FFN units of a GPT-2 (zero input weights: a constant pre-activation) are
    counted exactly at both sites; an intact layer has none."""
    model = hf_gpt2(vocab=50, layers=2, d=16)
    dead = [0, 3, 4, 10, 33, 63]  # of 64 FFN units in layer 1
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[:, dead] = 0.0  # Conv1D: [in, out]
        model.transformer.h[1].mlp.c_fc.bias[dead] = -1.0
    batches = [torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    df = measure_model(model, batches)
    layer1 = df[(df.layer == 1) & (df.bucket == "all")]
    assert set(layer1.site) == {"pre", "post"}
    assert list(layer1.dormant_frac) == [len(dead) / 64] * 2
    assert list(df[(df.layer == 0) & (df.bucket == "all")].dormant_frac) == [0.0, 0.0]


def test_rank_falloff_between_windows():
    """A planted trajectory: the hard rank halves between steps 20 and 30 in layer 0 and 1
    (the median over layers falls by log 2); the dormant fraction rises by 0.25 there."""
    import pandas as pd

    from capscale.analysis import falloff_summary, rank_falloff

    rows = []
    for step, hard, soft, dormant in ((10, 8.0, 16.0, 0.0), (20, 8.0, 16.0, 0.0), (30, 4.0, 12.0, 0.25)):
        for layer in range(3):
            rows.append(
                dict(
                    run_id="r",
                    site="post",
                    bucket="all",
                    step=step,
                    layer=layer,
                    hard_rank=hard * (1 + layer),
                    soft_rank=soft * (1 + layer),
                    dormant_frac=dormant,
                )
            )
    fo = rank_falloff(pd.DataFrame(rows))
    assert list(fo.step) == [10, 20, 30]
    assert np.isnan(fo.d_log_hard.iloc[0]) and fo.d_log_hard.iloc[1] == 0.0
    assert fo.d_log_hard.iloc[2] == pytest.approx(np.log(0.5))
    assert fo.d_log_soft.iloc[2] == pytest.approx(np.log(0.75))
    assert fo.d_dormant.iloc[2] == pytest.approx(0.25)
    summary = falloff_summary(fo).iloc[0]
    assert summary.max_falloff_hard == pytest.approx(np.log(2)) and summary.step_max_falloff_hard == 30
    assert summary.total_d_dormant == pytest.approx(0.25)
    # spectra written without the column: the ranks still, dormant NaN
    no_dormant = rank_falloff(pd.DataFrame(rows).drop(columns="dormant_frac"))
    assert no_dormant.dormant_frac.isna().all() and no_dormant.d_log_hard.iloc[2] == pytest.approx(np.log(0.5))
