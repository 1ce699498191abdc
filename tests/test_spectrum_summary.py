"""spectrum_summary: one record with ranks, NerVE metrics and sampling reliability."""

import math
import subprocess
import sys

import numpy as np
import pytest

from capscale.spectrum import SAMPLING_STATUSES, sampling_status, soft_rank, spectrum_summary


@pytest.mark.parametrize(
    "n,d,status",
    [
        (2560, 256, "well_sampled"),
        (2559, 256, "moderately_undersampled"),
        (768, 256, "moderately_undersampled"),
        (767, 256, "severely_undersampled"),
        (2, 256, "severely_undersampled"),
        (1, 256, "insufficient"),
        (0, 4, "insufficient"),
    ],
)
def test_sampling_status_thresholds(n, d, status):
    assert sampling_status(n, d) == status
    assert status in SAMPLING_STATUSES


def test_record_fields_and_values():
    lam = np.array([4.0, 2.0, 1.0, 1.0])
    rec = spectrum_summary(lam, n_samples=3)
    assert rec["dim"] == 4 and rec["n_samples"] == 3
    assert rec["max_empirical_rank"] == 2  # min(D, N-1)
    assert rec["samples_per_dim"] == 0.75
    assert rec["sampling_status"] == "severely_undersampled"
    assert rec["soft_rank"] == pytest.approx(soft_rank(lam))
    assert rec["hard_rank"] == pytest.approx(64 / 22)
    assert rec["participation_ratio"] == rec["hard_rank"]
    assert rec["renyi_rank_inf"] == pytest.approx(2.0)
    assert rec["asymmetry"] == pytest.approx(math.log(rec["soft_rank"] / rec["hard_rank"]))
    assert rec["spectral_entropy"] == pytest.approx(math.log(rec["soft_rank"]))
    assert rec["soft_rank_frac_dim"] == pytest.approx(rec["soft_rank"] / 4)
    assert rec["hard_rank_frac_max"] == pytest.approx(rec["hard_rank"] / 2)
    assert rec["trace"] == 8.0 and rec["lambda_max"] == 4.0


def test_insufficient_record_is_nan_not_an_error():
    rec = spectrum_summary(None, 1, dim=8)
    assert rec["sampling_status"] == "insufficient"
    assert math.isnan(rec["soft_rank"]) and math.isnan(rec["hard_rank_frac_dim"])
    assert rec["max_empirical_rank"] == 0


def test_bad_summary_input():
    with pytest.raises(ValueError, match="dim is required"):
        spectrum_summary(None, 0)
    with pytest.raises(ValueError, match="3 eigenvalues for dim=4"):
        spectrum_summary([1.0, 1.0, 1.0], 10, dim=4)
    with pytest.raises(ValueError, match="dim must be >= 2"):
        spectrum_summary([1.0], 10)
    with pytest.raises(ValueError, match="n_samples"):
        spectrum_summary([1.0, 2.0], -1)


def test_core_imports_without_torch():
    code = "import sys, capscale, capscale.spectrum; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metric_table_is_the_one_source():
    """Summary fields, aggregated metrics and report columns all come from SPECTRUM_METRICS;
    each table entry agrees with its standalone function in capscale.spectrum.ranks."""
    from capscale import spectrum
    from capscale.analysis import METRICS
    from capscale.analysis.aggregate import REPORT_COLUMNS
    from capscale.spectrum import SPECTRUM_METRICS

    lam = np.array([5.0, 3.0, 1.0, 0.5, 1e-12])
    rec = spectrum_summary(lam, n_samples=100)
    names = [m.name for m in SPECTRUM_METRICS]
    assert [k for k in rec if k in names] == names
    assert METRICS == tuple(m.name for m in SPECTRUM_METRICS if m.aggregated)
    assert "lambda_max" in rec and "lambda_max" not in METRICS
    assert REPORT_COLUMNS == ("soft_rank", "hard_rank", "soft_frac", "hard_frac")
    for m in SPECTRUM_METRICS:
        if m.frac:
            assert rec[f"{m.name}_frac_dim"] == rec[m.name] / 5
    reference = {n: getattr(spectrum, n)(lam) for n in ("soft_rank", "hard_rank", "asymmetry", "spectral_entropy")}
    reference["renyi_rank_0_5"] = spectrum.renyi_rank(lam, 0.5)
    reference["renyi_rank_inf"] = spectrum.renyi_rank(lam, np.inf)
    reference["early_enrichment"] = spectrum.early_enrichment(lam)
    reference["participation_ratio"] = spectrum.participation_ratio(lam)
    for name, value in reference.items():
        assert rec[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
