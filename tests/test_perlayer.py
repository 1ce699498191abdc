"""Final-window aggregation, per-layer Δβ, the depth × optimizer interaction and lack of fit (analysis-level frames)."""

import itertools
import math

import numpy as np
import pandas as pd

from capscale.analysis.aggregate import last_k_per_layer
from capscale.analysis.contrasts import cell_contrasts, seed_betas
from capscale.analysis.design import design_of
from capscale.analysis.perlayer import interaction, lack_of_fit, layer_contrasts, layer_seed_betas

WIDTHS = (64, 128, 256, 512)


def test_final_aggregate_uses_the_final_fraction_of_every_run_length():
    rows = []
    for run_id, steps, every in (("short", 140, 64), ("long", 3120, 80)):
        logged = sorted(set(range(0, steps, every)) | {steps})
        for step in logged:
            rows.append(
                dict(
                    run_id=run_id,
                    site="post",
                    bucket="all",
                    layer=0,
                    step=step,
                    soft_rank=float(step),
                    hard_rank=float(step),
                    dim=64,
                    sampling_status="well_sampled",
                    samples_per_dim=20.0,
                )
            )
    spectra = pd.DataFrame(rows)
    agg = last_k_per_layer(spectra, last_k=5, final_fraction=0.2).set_index("run_id")
    # short: logged 0, 64, 128, 140; the final 20% (≥ 112) holds 128 and 140 — never step 0 or 64
    assert agg.loc["short", "soft_rank"] == np.median([128, 140]) and agg.loc["short", "n_steps"] == 2
    # long: the last 5 of the records ≥ 2496
    assert agg.loc["long", "soft_rank"] == np.median([2800, 2880, 2960, 3040, 3120])
    # the old rule (last 5 logged steps) reaches back to step 0 for the short run
    assert last_k_per_layer(spectra, 5).set_index("run_id").loc["short", "soft_rank"] == np.median([0, 64, 128, 140])


def _depth_study(rng, layer_effect, seeds=(0, 1, 2), noise=0.03):
    """Optimizer × depth (2, 6); muon's β_hard is higher by ``layer_effect[depth][layer]`` in that layer."""
    runs, configs, per_layer = [], {}, []
    for label, depth in itertools.product(("adamw", "muon"), (2, 6)):
        for seed in seeds:
            jitter = {layer: rng.normal(0, noise) for layer in range(depth)}
            for w in WIDTHS:
                run_id = f"{label}_L{depth}_s{seed}_w{w}"
                configs[run_id] = {
                    "model": {"n_layer": depth, "d_model": 64, "ffn_width": w},
                    "optimizer": {"name": label, "label": label},
                    "train": {"steps": 100, "seed": seed},
                }
                runs.append(
                    dict(
                        run_id=run_id,
                        label=label,
                        optimizer=label,
                        width=w,
                        seed=seed,
                        series=f"{label} · n_layer={depth}",
                        path="",
                    )
                )
                for layer in range(depth):
                    extra = layer_effect.get(depth, {}).get(layer, 0.0) if label == "muon" else 0.0
                    beta = 0.3 + extra + jitter[layer]
                    hard = math.exp(1 + beta * math.log(w) + rng.normal(0, noise))
                    per_layer.append(
                        dict(run_id=run_id, site="post", bucket="all", layer=layer, hard_rank=hard, soft_rank=2 * hard)
                    )
    design, runs = design_of(pd.DataFrame(runs), configs)
    return design, runs, pd.DataFrame(per_layer)


def test_per_layer_delta_beta_finds_the_layer_that_differs():
    design, runs, per_layer = _depth_study(np.random.default_rng(0), {6: {5: 0.4}})
    seed, by = layer_seed_betas(per_layer, runs)
    out = layer_contrasts(seed, by)
    hard = out[out["metric"] == "hard_rank"]
    hits = hard[hard["resolved"]]
    assert list(zip(hits["cell"], hits["layer"])) == [("n_layer=6", 5)]
    assert hits["low"].iloc[0] > 0.2


def test_depth_by_optimizer_interaction_has_an_interval():
    # muon steeper by 0.3 in every layer at depth 6 only: the gap opens with depth
    design, runs, per_layer = _depth_study(np.random.default_rng(1), {6: dict.fromkeys(range(6), 0.3)})
    points = per_layer.groupby(["run_id", "site", "bucket"], as_index=False)[["hard_rank", "soft_rank"]].median()
    contrasts = cell_contrasts(seed_betas(points, runs))
    inter = interaction(contrasts, design.cells)
    row = inter[(inter["metric"] == "hard_rank")].iloc[0]
    assert (row["shallow"], row["deep"]) == ("n_layer=2", "n_layer=6")
    assert row["low"] > 0.15 and row["high"] < 0.45 and math.isfinite(row["mde"])
    # no depth factor: no interaction rows
    assert interaction(contrasts, design.cells.drop(columns=["n_layer"])).empty


def test_lack_of_fit_flags_a_curve_and_passes_a_power_law():
    rng = np.random.default_rng(2)
    rows, runs = [], []
    for series, curve in (("straight", 0.0), ("curved", 0.4)):
        for seed, w in itertools.product(range(3), (32, 64, 128, 256, 512)):
            x = math.log(w / 32)
            run_id = f"{series}_{seed}_{w}"
            runs.append(dict(run_id=run_id, series=series, width=w))
            hard = math.exp(1 + 0.3 * x + curve * x**2 / 4 + rng.normal(0, 0.02))
            rows.append(dict(run_id=run_id, site="post", bucket="all", hard_rank=hard, soft_rank=2 * hard))
    lof = lack_of_fit(pd.DataFrame(rows), pd.DataFrame(runs))
    p = lof[lof["metric"] == "hard_rank"].set_index("series")["p"]
    assert p["curved"] < 1e-4 and p["straight"] > 0.01
