"""Realized capacity and plasticity (``report.json`` key ``plasticity``): shown when the sweep directory
holds results of ``capscale plasticity`` (a ``plasticity.json`` at any depth below it, e.g.
``capscale plasticity SWEEP ... --out SWEEP/plasticity``) that continue runs of the analysed sweep.

Each continued run is joined, by its run directory's name, to its pretraining run's capacity at the
end of pretraining (the report's own aggregate, all tokens, the headline site) and final validation
loss; the relation regresses adaptation (``auc_new``: mean new-domain loss over the K steps, lower =
faster), the loss drop and forgetting on log hard rank at matched pretraining loss, within and
across optimizers, with intervals clustered by seed (``capscale.analysis.plasticity``). Without
results the key holds ``{"shown": false, "why": ...}`` and the page has no section.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from capscale.analysis import Analysis
from capscale.analysis.plasticity import find_plasticity, join_capacity, plasticity_relation
from capscale.report.format import Section, get, interval, num, table
from capscale.report.records import jsonable, records

KEY = "plasticity"
MEASURES = ("auc_new", "adaptation", "forgetting")
_WHAT = {
    "auc_new": "auc_new (mean new-domain loss over K steps; lower = faster)",
    "adaptation": "adaptation (new-domain loss drop in K steps)",
    "forgetting": "forgetting (rise of the original validation loss)",
}


def data(a: Analysis) -> dict:
    root = a.sweep.root
    if root is None:
        return {"shown": False, "why": "no sweep directory to look for plasticity results in"}
    results = find_plasticity(root)
    if results.empty:
        return {"shown": False, "why": f"no plasticity.json below {root}"}
    site = a.params.site
    joined = join_capacity(results, a.points, a.sweep.runs, site)
    matched = joined[np.isfinite(joined["pre_hard_rank"].astype(float))]
    if matched.empty:
        return {"shown": False, "why": f"{len(results)} plasticity result(s), none continues a run of this sweep"}
    relation = pd.concat(
        [plasticity_relation(matched, y=y, confidence=a.params.confidence) for y in MEASURES if y in matched],
        ignore_index=True,
    )
    cap = [f"{site}_{m}_{w}" for m in ("hard_rank", "dormant_frac") for w in ("0", "k")]
    cols = [
        "pre_run_id", "label", "ffn_width", "seed", "steps", "pre_soft_rank", "pre_hard_rank", "pre_val_loss",
        "val_loss_new_0", "val_loss_new_k", "auc_new", "adaptation", "forgetting", *cap,
        f"d_{site}_hard_rank", f"d_{site}_dormant_frac",
    ]  # fmt: skip
    by_label = (
        matched.groupby("label", sort=True)
        .agg(
            n=("auc_new", "size"),
            n_seeds=("seed", "nunique"),
            pre_hard_rank=("pre_hard_rank", "median"),
            pre_val_loss=("pre_val_loss", "mean"),
            auc_new=("auc_new", "mean"),
            adaptation=("adaptation", "mean"),
            forgetting=("forgetting", "mean"),
        )
        .reset_index()
    )
    descriptions = sorted({str(v) for v in matched.get("data_description", pd.Series(dtype=object)).dropna()})
    return jsonable(
        {
            "shown": True,
            "site": site,
            "confidence": a.params.confidence,
            "n_results": len(results),
            "n_matched": len(matched),
            "n_seeds": int(matched["seed"].nunique()),
            "steps": sorted({int(k) for k in matched["steps"]}),
            "data": descriptions,
            "method": (
                "each continued run joined by its run directory's name to its pretraining run: capacity at the end "
                f"of pretraining = the report's aggregate ({site}-activation, all tokens, median over layers), "
                "pretraining loss = its final validation loss; relation: OLS of the measure on log pretraining "
                "hard rank with the pretraining loss as covariate (matched loss), 'within' with one intercept per "
                "optimizer label, 'across' with one intercept; standard errors the larger of the seed-clustered "
                "(CR1) and the classical, t with G − 1 df (plain OLS with one seed)"
            ),
            "relation": records(relation),
            "by_label": records(by_label),
            "runs": records(matched.sort_values(["label", "ffn_width", "seed"]), cols),
        }
    )


def _slope(r: dict) -> str:
    if r.get("note"):
        return f"not estimable: {r['note']}"
    return f"{num(r['slope'])} {interval(r['ci_low'], r['ci_high'])}"


def _excludes_zero(r: dict) -> bool:
    return r.get("ci_low") is not None and (r["ci_low"] > 0 or r["ci_high"] < 0)


def section(d: dict) -> Section | None:
    q = d.get(KEY)
    if not q or not q.get("shown"):
        return None
    site, conf, seeds = q["site"], q["confidence"], q["n_seeds"]
    steps = ", ".join(str(k) for k in q["steps"])
    how = f"clustered by seed ({seeds} seeds, t with {seeds - 1} df)" if seeds > 1 else "one seed: plain OLS"
    relation = table(
        f"Does realized capacity at the end of pretraining predict plasticity? Slope of each measure on log "
        f"pretraining hard rank R2 ({site}-activation), at matched pretraining loss, {conf:.0%} intervals {how}. "
        "Highlighted: an interval that excludes no relation.",
        [
            ("measure", lambda r: _WHAT.get(r["y"], r["y"])),
            ("fit", lambda r: "within optimizers" if r["kind"] == "within" else "across optimizers"),
            ("slope per e-fold of R2 [CI]", _slope),
            ("runs", get("n")),
            ("seeds", get("n_seeds")),
        ],
        q["relation"],
        _excludes_zero,
        answer=2,
    )
    labels = table(
        "Per optimizer: the mean of each measure over its continued runs (median pretraining R2).",
        [
            ("optimizer", get("label")),
            ("runs", get("n")),
            ("seeds", get("n_seeds")),
            ("pretraining R2", lambda r: num(r["pre_hard_rank"], 2)),
            ("pretraining val loss", get("pre_val_loss")),
            ("auc_new", get("auc_new")),
            ("adaptation", get("adaptation")),
            ("forgetting", get("forgetting")),
        ],
        q["by_label"],
    )
    runs = table(
        f"Each continued run: pretraining capacity and loss, adaptation and forgetting, and the change of the "
        f"{site}-activation hard rank and dormant-unit fraction over the K steps (measured on the same fixed "
        "batches of the new domain before and after).",
        [
            ("run", get("pre_run_id")),
            ("optimizer", get("label")),
            ("FFN", get("ffn_width")),
            ("seed", get("seed")),
            ("pretraining R2", lambda r: num(r["pre_hard_rank"], 2)),
            ("pretraining val loss", get("pre_val_loss")),
            ("auc_new", get("auc_new")),
            ("adaptation", get("adaptation")),
            ("forgetting", get("forgetting")),
            (
                "R2 before → after",
                lambda r: f"{num(r.get(f'{site}_hard_rank_0'), 2)} → {num(r.get(f'{site}_hard_rank_k'), 2)}",
            ),
            (
                "dormant before → after",
                lambda r: f"{num(r.get(f'{site}_dormant_frac_0'))} → {num(r.get(f'{site}_dormant_frac_k'))}",
            ),
        ],
        q["runs"],
        collapsed=len(q["runs"]) > 12,
    )
    corpus = "; ".join(q["data"]) or "not recorded"
    text = [
        "The blog's open question 2: does a model with similar loss but different spectral allocation keep "
        f"learning differently? {q['n_matched']} finished run(s) of this sweep were continued for K = {steps} "
        f"steps on a second domain ({corpus}) with their own optimizer state, telemetry on (capscale plasticity).",
        "Adaptation speed is auc_new, the mean new-domain validation loss over the K steps (lower = faster); "
        "forgetting is the rise of the original validation loss. Each is regressed on the log hard rank at the end "
        "of pretraining with the pretraining loss as a covariate, so runs are compared at matched loss: 'within' "
        "optimizers (one intercept each) and 'across' them (the optimizers' different capacities enter too).",
        "An interval that contains 0 is absence of evidence, not evidence of absence; a slope across optimizers "
        "does not separate capacity from everything else the optimizers differ in (their learning rates, for one).",
    ]
    if q["n_results"] > q["n_matched"]:
        text.append(
            f"{q['n_results'] - q['n_matched']} plasticity result(s) below the sweep continue runs that are not "
            "among the analysed runs and are left out."
        )
    return Section(
        "plasticity", "Realized capacity and plasticity on a second domain", text, [], [relation, labels, runs]
    )
