"""capscale.spectrum: the pure numerics of realized spectral capacity (NumPy; torch optional).

Knows nothing of models. docs/conventions.md states the conventions these follow.
"""

from capscale.spectrum.buckets import BUCKETS, BucketedCovariance, FrequencyTable
from capscale.spectrum.covariance import (
    EIG_FLOOR,
    EIG_FLOOR_RTOL,
    IndefiniteCovarianceError,
    InsufficientSamplesError,
    NonFiniteError,
    StreamingCovariance,
    clamp_spectrum,
    eig_floor,
    eigenvalues_from_covariance,
)
from capscale.spectrum.fit import PowerLawFit, bootstrap_power_law, fit_power_law
from capscale.spectrum.ranks import (
    asymmetry,
    early_enrichment,
    hard_rank,
    hard_rank_from_covariance,
    js_divergence,
    participation_ratio,
    probabilities,
    renyi_rank,
    soft_rank,
    spectral_entropy,
)
from capscale.spectrum.summary import (
    DORMANT_REL_VARIANCE,
    SAMPLING_STATUSES,
    SPECTRUM_METRICS,
    Metric,
    dormant_fraction,
    sampling_status,
    spectrum_summary,
)

__all__ = [
    "BUCKETS",
    "DORMANT_REL_VARIANCE",
    "EIG_FLOOR",
    "EIG_FLOOR_RTOL",
    "SAMPLING_STATUSES",
    "SPECTRUM_METRICS",
    "BucketedCovariance",
    "FrequencyTable",
    "IndefiniteCovarianceError",
    "Metric",
    "InsufficientSamplesError",
    "NonFiniteError",
    "PowerLawFit",
    "StreamingCovariance",
    "asymmetry",
    "bootstrap_power_law",
    "clamp_spectrum",
    "dormant_fraction",
    "early_enrichment",
    "eig_floor",
    "eigenvalues_from_covariance",
    "fit_power_law",
    "hard_rank",
    "hard_rank_from_covariance",
    "js_divergence",
    "participation_ratio",
    "probabilities",
    "renyi_rank",
    "sampling_status",
    "soft_rank",
    "spectral_entropy",
    "spectrum_summary",
]
