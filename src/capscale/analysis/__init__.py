"""capscale.analysis: run directories → pandas frames → β fits, matched-loss pairs, phase map.

Reads run directories only (the contract written by ``capscale.train``); imports
``capscale.spectrum`` for the fits and nothing above it.

    from capscale.analysis import analyze
    a = analyze("sweeps/demo", last_k=5, tolerance=0.02)
    a.betas      # β_soft, β_hard, Δβ with t- and bootstrap intervals per series × site × bucket
    a.matched    # matched-loss pairs and their geometry
    a.phase      # each run's (R1/D, R2/D) and region
    a.levels     # rank ratios of pairs of series at matched widths
"""

from capscale.analysis.aggregate import ALL_BUCKETS, METRICS, aggregate_runs, last_k_per_layer, seed_spread, tidy
from capscale.analysis.compare import beta_difference, effect_summary, optimizer_architecture
from capscale.analysis.falloff import falloff_summary, rank_falloff
from capscale.analysis.fits import FIT_METRICS, FitOptions, beta_table, fit_scaling
from capscale.analysis.levels import LEVEL_METRICS, level_ratios
from capscale.analysis.matched import loss_by_width, matched_loss_pairs
from capscale.analysis.phase import REGIONS, PhaseThresholds, classify, phase_map
from capscale.analysis.pipeline import Analysis, AnalysisParams, analyze
from capscale.analysis.runs import (
    ARCH_AXES,
    IncompatibleRunsError,
    NoFinishedRunsError,
    Sweep,
    load_sweep,
    run_keys,
)
from capscale.analysis.trajectories import (
    beta_trajectories,
    bucket_capacity,
    loss_curves,
    pair_trajectories,
    rank_trajectories,
    separation,
)

__all__ = [
    "ALL_BUCKETS",
    "ARCH_AXES",
    "FIT_METRICS",
    "METRICS",
    "REGIONS",
    "Analysis",
    "AnalysisParams",
    "FitOptions",
    "LEVEL_METRICS",
    "IncompatibleRunsError",
    "NoFinishedRunsError",
    "PhaseThresholds",
    "Sweep",
    "aggregate_runs",
    "analyze",
    "beta_difference",
    "beta_table",
    "beta_trajectories",
    "bucket_capacity",
    "classify",
    "effect_summary",
    "falloff_summary",
    "fit_scaling",
    "last_k_per_layer",
    "level_ratios",
    "load_sweep",
    "loss_by_width",
    "loss_curves",
    "matched_loss_pairs",
    "optimizer_architecture",
    "pair_trajectories",
    "rank_falloff",
    "phase_map",
    "rank_trajectories",
    "run_keys",
    "seed_spread",
    "separation",
    "tidy",
]
