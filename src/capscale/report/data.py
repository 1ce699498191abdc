"""The report's content as one JSON-ready dict: ``report.json``, and the only source of the HTML/MD tables.

Because the HTML and Markdown renderers read nothing but this dict, every number
they show is in ``report.json`` (at full precision; the pages round it).
Sections follow the five questions: ``q1_scaling``, ``q2_matched_loss``,
``q3_asymmetry``, ``q4_regimes``, ``q5_optimizer_architecture``; then
``training``, ``reliability``, ``runs``, ``excluded_runs``, ``parameters``.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
from typing import Any

import numpy as np
import pandas as pd

import capscale
from capscale.analysis import Analysis
from capscale.analysis.aggregate import REPORT_COLUMNS
from capscale.report.trajectory import trajectory_data
from capscale.spectrum.summary import REPORT_METRICS

FORMAT = "capscale.report"
FORMAT_VERSION = 1
_BETA_FIELDS = (
    "beta",
    "ci_low",
    "ci_high",
    "boot_low",
    "boot_high",
    "boot_over",
    "r2",
    "n",
    "n_low_nd",
    "fittable",
    "reason",
)


def jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf and missing values become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


def _records(df: pd.DataFrame, columns: list[str] | None = None) -> list[dict]:
    if columns is not None:
        df = df[[c for c in columns if c in df.columns]]
    return jsonable(df.to_dict(orient="records"))


def _beta_row(r: pd.Series) -> dict:
    """One series × site × bucket: β_soft, β_hard and Δβ, each with its intervals."""
    out = {k: r[k] for k in ("series", "setting", "label", "steps", "arch", "site", "bucket", "n_widths")}
    for kind in ("soft", "hard", "delta"):
        out[f"beta_{kind}"] = {f: r[f"{kind}_{f}"] for f in _BETA_FIELDS}
    return out


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _beta_text(b: dict) -> str:
    return f"{_fmt(b['beta'])} [{_fmt(b['ci_low'])}, {_fmt(b['ci_high'])}]"


def report_data(a: Analysis) -> dict:
    """Everything the report shows, as plain JSON types."""
    p = a.params
    betas = [_beta_row(r) for _, r in a.betas.sort_values(["series", "site", "bucket"]).iterrows()]
    head = [b for b in betas if b["site"] == p.site and b["bucket"] == "all"]
    by_regime = [b for b in betas if b["site"] == p.site]
    runs = a.sweep.runs
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sweep": {
            "name": a.sweep.name,
            "path": str(a.sweep.root) if a.sweep.root else None,
            "spec": a.sweep.spec,
            "n_runs_analysed": len(runs),
            "n_runs_excluded": len(a.sweep.excluded),
            "series": sorted(runs["series"].unique()),
            "labels": sorted(runs["label"].unique()),
            "widths": sorted(int(w) for w in runs["width"].unique()),
            "arch_axes": list(a.sweep.arch_axes),
        },
        "parameters": {
            **p.to_dict(),
            "headline_bucket": "all",
            "aggregation": f"median of the last {p.last_k} logged steps per layer, then median over layers",
            "fit": "OLS of log rank on log width (seeds as replicate points), "
            f"{p.confidence:.0%} t-interval; bootstrap: percentile, {p.n_resamples} resamples",
        },
        "versions": _versions(),
        "betas": betas,
        "q1_scaling": {
            "site": p.site,
            "fits": head,
            "points": _records(a.spread[a.spread["metric"].isin([m.name for m in REPORT_METRICS])]),
        },
        "q2_matched_loss": {
            "tolerance": p.tolerance,
            "pairs": _records(a.matched),
            "loss_by_width": _records(a.losses),
        },
        "q3_asymmetry": {
            "delta_beta": head,
            "phase": _records(a.phase),
            "region_counts": _records(a.phase.groupby(["series", "region"]).size().rename("n_runs").reset_index()),
            "thresholds": p.phase.to_dict(),
        },
        "q4_regimes": {"betas": by_regime, "bucket_capacity": _records(_bucket_table(a))},
        "q5_optimizer_architecture": {
            "arch_axes": list(a.sweep.arch_axes),
            "cells": _records(a.cells),
            "effects": _records(a.effects),
            "summary": _records(a.effect_summary),
        },
        "training": {
            "final": _records(
                runs,
                [
                    "run_id",
                    "series",
                    "width",
                    "seed",
                    "final_val_loss",
                    "final_val_loss_head",
                    "final_val_loss_mid",
                    "final_val_loss_tail",
                ],
            )
        },
        "reliability": {"low_nd": _records(a.low_nd), "n_aggregates": len(a.points)},
        "beta_trajectory": trajectory_data(a),
        "runs": _records(
            runs,
            [
                "run_id",
                "name",
                "series",
                "label",
                "optimizer",
                "steps",
                "width",
                "seed",
                *a.sweep.arch_axes,
                "final_val_loss",
                "status",
            ],
        ),
        "excluded_runs": _records(
            a.sweep.excluded, ["run_id", "name", "status", "reason", "step", "label", "width", "seed"]
        ),
    }
    data = jsonable(data)
    data["summary"] = {"headline": data["q1_scaling"]["fits"], "findings": findings(data)}
    return data


def _bucket_table(a: Analysis) -> pd.DataFrame:
    """Per series × width × bucket: seed-median final val loss and capacity (R1/D, R2/D)."""
    cols = ["val_loss", *REPORT_COLUMNS]
    return a.buckets.groupby(["series", "width", "bucket"])[cols].median().reset_index()


def _versions() -> dict:
    import matplotlib
    import scipy

    return {
        "capscale": capscale.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pandas": pd.__version__,
        "matplotlib": matplotlib.__version__,
    }


def findings(d: dict) -> list[str]:
    """Short statements for the summary, each computed from the data (no hand-written numbers)."""
    out = []
    site = d["parameters"]["site"]
    fit = [b for b in d["q1_scaling"]["fits"] if b["beta_hard"]["fittable"]]
    n_series = len(d["q1_scaling"]["fits"])
    if fit:
        hi = max(fit, key=lambda b: b["beta_hard"]["beta"])
        lo = min(fit, key=lambda b: b["beta_hard"]["beta"])
        out.append(
            f"Hard-rank scaling ({site}-activation, all tokens): highest β_hard {hi['series']} "
            f"{_beta_text(hi['beta_hard'])}, lowest {lo['series']} {_beta_text(lo['beta_hard'])}; "
            f"{len(fit)} of {n_series} series fittable."
        )
    else:
        out.append(f"No series is fittable: a fit needs at least 3 widths with finite ranks ({n_series} series).")
    pairs = d["q2_matched_loss"]["pairs"]
    tol = d["q2_matched_loss"]["tolerance"]
    if pairs:
        widths: dict[tuple[str, str], list[int]] = {}
        for p in pairs:
            widths.setdefault((p["series_a"], p["series_b"]), []).append(p["width"])
        listed = "; ".join(f"{a} vs {b} at width {', '.join(map(str, ws))}" for (a, b), ws in widths.items())
        diff = sum(p["geometry"] == "different" for p in pairs)
        out.append(
            f"Matched loss (within {tol:g} nats): {listed}. In {diff} of these {len(pairs)} matches the "
            "β intervals of the two series are disjoint: same loss, different spectral geometry."
        )
    else:
        out.append(f"Matched loss: no two series agree in final validation loss within {tol:g} nats at a common width.")
    counts: dict[str, int] = {}
    for r in d["q3_asymmetry"]["region_counts"]:
        counts[r["region"]] = counts.get(r["region"], 0) + r["n_runs"]
    out.append("Phase map: " + ", ".join(f"{n} run(s) {reg}" for reg, n in sorted(counts.items())) + ".")
    if counts.get("impossible"):
        out.append(f"{counts['impossible']} run(s) fall in the impossible region R2 > R1: a measurement error.")
    tails = [b for b in d["q4_regimes"]["betas"] if b["bucket"] == "tail" and b["beta_hard"]["fittable"]]
    if tails:
        listed = "; ".join(f"{b['series']} {_beta_text(b['beta_hard'])}" for b in tails)
        out.append(f"TAIL-token β_hard: {listed}.")
    summ = {r["metric"]: r for r in d["q5_optimizer_architecture"]["summary"]}
    hard = summ.get("hard", {})
    if hard.get("larger"):
        out.append(
            f"Optimizer vs architecture (β_hard): median optimizer span {_fmt(hard['optimizer_span'])}, "
            f"median architecture span {_fmt(hard['architecture_span'])}: "
            f"the {hard['larger']} effect is larger."
        )
    elif not d["q5_optimizer_architecture"]["arch_axes"]:
        out.append("No architecture axis varied in this sweep: only optimizer effects can be compared.")
    low = d["reliability"]["low_nd"]
    if low:
        out.append(
            f"Reliability: {len(low)} of {d['reliability']['n_aggregates']} aggregates rest on records "
            "with N/D below 10 (not well sampled); they are flagged in the tables."
        )
    if d["excluded_runs"]:
        kinds: dict[str, int] = {}
        for r in d["excluded_runs"]:
            kinds[r["status"]] = kinds.get(r["status"], 0) + 1
        out.append(
            f"{len(d['excluded_runs'])} run(s) not analysed ("
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            + "); listed under Runs."
        )
    return out
