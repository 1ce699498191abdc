"""One call from run directories to every analysis frame: ``analyze(source, **params)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from capscale.analysis.aggregate import aggregate_runs, last_k_per_layer, seed_spread
from capscale.analysis.compare import effect_summary, optimizer_architecture
from capscale.analysis.contrasts import cell_contrasts, pooled_contrasts, seed_betas
from capscale.analysis.design import Design, apply_design
from capscale.analysis.fits import FitOptions, beta_table, fit_scaling
from capscale.analysis.levels import level_ratios
from capscale.analysis.matched import loss_by_width, matched_loss_pairs
from capscale.analysis.perlayer import interaction, lack_of_fit, layer_betas, layer_contrasts, layer_seed_betas
from capscale.analysis.phase import PhaseThresholds, phase_map
from capscale.analysis.runs import Sweep, load_sweep
from capscale.analysis.trajectories import (
    beta_trajectories,
    bucket_capacity,
    loss_curves,
    pair_trajectories,
    rank_trajectories,
    separation,
    series_pairs,
)

SITES = ("pre", "post")
TRAJECTORY_RESAMPLES = 200  # bootstrap size of each β-over-training fit (the final fits use n_resamples)


@dataclass(frozen=True)
class AnalysisParams:
    """Every choice the analysis makes; all are stated in the report.

    ``last_k``: at most this many logged steps per layer in the final aggregate (paper: 5),
    taken from the final ``final_fraction`` of each run (steps ≥ (1 − f) × its last logged step).
    ``tolerance``: matched-loss tolerance on the final validation loss, in nats.
    ``confidence``: level of the t- and bootstrap intervals. ``n_resamples`` and
    ``bootstrap_seed``: the bootstrap's size and seed (reproducible intervals).
    ``site``: the headline site (paper: post-activation). ``phase``: phase-map thresholds.
    """

    last_k: int = 5
    final_fraction: float = 0.2
    tolerance: float = 0.02
    confidence: float = 0.95
    n_resamples: int = 2000
    bootstrap_seed: int = 0
    site: str = "post"
    phase: PhaseThresholds = field(default_factory=PhaseThresholds)

    def __post_init__(self) -> None:
        if isinstance(self.last_k, bool) or not isinstance(self.last_k, int) or self.last_k < 1:
            raise ValueError(f"last_k must be a positive int, got {self.last_k!r}")
        if not (isinstance(self.final_fraction, (int, float)) and 0 < self.final_fraction <= 1):
            raise ValueError(f"final_fraction must be in (0, 1], got {self.final_fraction!r}")
        if not (isinstance(self.tolerance, (int, float)) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be >= 0 nats, got {self.tolerance!r}")
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if not isinstance(self.n_resamples, int) or self.n_resamples < 100:
            raise ValueError(f"n_resamples must be an int >= 100, got {self.n_resamples!r}")

    @classmethod
    def create(cls, **options: Any) -> AnalysisParams:
        """From flat keyword options: this class's fields and ``PhaseThresholds``' fields."""
        own = {f.name for f in fields(cls)} - {"phase"}
        phase_keys = {f.name for f in fields(PhaseThresholds)}
        unknown = sorted(set(options) - own - phase_keys - {"phase"})
        if unknown:
            raise ValueError(f"unknown analysis parameter(s) {unknown}; valid: {sorted(own | phase_keys)}")
        phase = options.get("phase") or {}
        phase = (
            phase
            if isinstance(phase, PhaseThresholds)
            else PhaseThresholds(**{**phase, **{k: v for k, v in options.items() if k in phase_keys}})
        )
        return cls(**{k: v for k, v in options.items() if k in own}, phase=phase)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Analysis:
    """All frames of one analysis (each documented in its module)."""

    sweep: Sweep
    params: AnalysisParams
    per_layer: pd.DataFrame  # run × site × bucket × layer: median of the last k steps
    points: pd.DataFrame  # run × site × bucket: median over layers (wide, one column per metric)
    spread: pd.DataFrame  # series × width × site × bucket × metric: across-seed median/min/max/n
    fits: pd.DataFrame  # series × site × bucket × metric (soft_rank, hard_rank, delta_beta)
    betas: pd.DataFrame  # the fits, wide: series × site × bucket
    losses: pd.DataFrame  # series × width: final validation loss across seeds
    matched: pd.DataFrame  # matched-loss pairs
    phase: pd.DataFrame  # run: (R1/D, R2/D) and region
    trajectories: pd.DataFrame  # run × step × site × bucket: ranks, median over layers
    curves: pd.DataFrame  # run × step: training and validation loss
    buckets: pd.DataFrame  # run × bucket: final val loss beside capacity
    cells: pd.DataFrame  # setting × arch: β
    effects: pd.DataFrame  # optimizer vs architecture spans
    effect_summary: pd.DataFrame
    low_nd: pd.DataFrame  # aggregates built from records with N/D below "well sampled"
    beta_trajectory: pd.DataFrame  # series × step × site × bucket × metric: β at each shared step
    pair_trajectory: pd.DataFrame  # pair × step × site × bucket × metric: Δβ and level ratio
    separation: pd.DataFrame  # pair × metric: the steps where the two β intervals are disjoint
    levels: pd.DataFrame  # pairs of series: rank ratio at matched widths (levels.level_ratios)
    design: Design  # factors, treatment, cells (design.design_of)
    seed_betas: pd.DataFrame  # series × seed × site × bucket × metric: β over that seed's widths
    contrasts: pd.DataFrame  # cell × pair of treatments × site × bucket × metric: Δβ over seeds, Holm
    pooled: pd.DataFrame  # pair of treatments × site × bucket × metric: fixed-effect pooled Δβ over cells
    layer_betas: pd.DataFrame  # series × site × bucket × layer × metric: β, t-interval over seeds
    layer_contrasts: pd.DataFrame  # cell × pair × site × bucket × layer × metric: Δβ over seeds, Holm
    interaction: pd.DataFrame  # depth × optimizer: change of Δβ between cells differing only in depth
    lack_of_fit: pd.DataFrame  # series × site × bucket × metric: pure-error F-test of the power law


def analyze(
    source: str | Path | list | Sweep,
    params: AnalysisParams | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Analysis:
    """Load (unless given a ``Sweep``) and analyse. ``options``: see ``AnalysisParams.create``;
    ``progress``: called with a line per stage."""
    say = progress or (lambda _: None)
    if params is not None and options:
        raise ValueError("give analysis parameters either as params= or as keyword options, not both")
    params = params or AnalysisParams.create(**options)
    sweep = source if isinstance(source, Sweep) else load_sweep(source)
    sweep, design = apply_design(sweep)
    say(f"design: {len(design.cells)} cell(s), factors {list(design.factors) or 'none'}; aggregating")
    runs = sweep.runs
    per_layer = last_k_per_layer(sweep.spectra, params.last_k, params.final_fraction)
    points = aggregate_runs(per_layer)
    say("fitting β per series")
    fits = fit_scaling(
        points, per_layer, runs, FitOptions(params.confidence, params.n_resamples, params.bootstrap_seed)
    )
    betas = beta_table(fits)
    cells, effects = optimizer_architecture(betas, points, runs, site=params.site, confidence=params.confidence)
    info = runs[["run_id", "name", "series", "width", "seed"]]
    # β at every shared step: a fit per step, so the trajectory's bootstrap is smaller
    traj_options = FitOptions(params.confidence, min(params.n_resamples, TRAJECTORY_RESAMPLES), params.bootstrap_seed)
    say("β over training (a fit per shared step)")
    traj = beta_trajectories(sweep.spectra, runs, traj_options)
    pairs = series_pairs(runs)
    say("within-cell contrasts, per layer")
    seed_beta = seed_betas(points, runs)
    contrasts = cell_contrasts(seed_beta, params.confidence)
    layer_seed, by = layer_seed_betas(per_layer, runs)
    low_nd = points[points["worst_status"] != "well_sampled"].merge(info, on="run_id")
    return Analysis(
        sweep=sweep,
        params=params,
        per_layer=per_layer,
        points=points,
        spread=seed_spread(points, runs),
        fits=fits,
        betas=betas,
        losses=loss_by_width(runs),
        matched=matched_loss_pairs(runs, points, fits, params.tolerance, params.site, params.confidence),
        phase=phase_map(points, runs, params.phase, site=params.site),
        trajectories=rank_trajectories(sweep.spectra, runs),
        curves=loss_curves(sweep.metrics, runs),
        buckets=bucket_capacity(runs, points, params.site),
        cells=cells,
        effects=effects,
        effect_summary=effect_summary(effects),
        low_nd=low_nd[
            ["run_id", "name", "series", "width", "seed", "site", "bucket", "worst_status", "min_samples_per_dim"]
        ].sort_values(["series", "width", "seed", "site", "bucket"], ignore_index=True),
        beta_trajectory=traj,
        pair_trajectory=pair_trajectories(sweep.spectra, runs, pairs, params.confidence),
        separation=pd.concat(
            [separation(traj, pairs, site=params.site, metric=m) for m in ("hard_rank", "soft_rank")],
            ignore_index=True,
        ),
        levels=level_ratios(points, runs, params.site, params.confidence),
        design=design,
        seed_betas=seed_beta,
        contrasts=contrasts,
        pooled=pooled_contrasts(contrasts, params.confidence),
        layer_betas=layer_betas(layer_seed, by, params.confidence),
        layer_contrasts=layer_contrasts(layer_seed, by, params.confidence),
        interaction=interaction(contrasts, design.cells, params.confidence),
        lack_of_fit=lack_of_fit(points, runs),
    )
