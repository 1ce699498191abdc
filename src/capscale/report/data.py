"""The report's content as one JSON-ready dict: ``report.json``, and the only source of the HTML/MD tables.

Because the HTML and Markdown renderers read nothing but this dict, every number
they show is in ``report.json`` (at full precision; the pages round it).
This module writes the parts every section reads (``sweep``, ``parameters``, ``versions``,
``betas``, ``levels`` — rank ratios of pairs of series —, ``reliability``, ``runs``,
``excluded_runs``); each module of ``capscale.report.sections`` writes its own part
(``q1_scaling`` … ``q5_optimizer_architecture``, ``design``, ``per_layer``, ``training``,
``beta_trajectory``) and adds its verdict to ``answers``, one plain verdict per question.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform

import numpy as np
import pandas as pd

import capscale
from capscale.analysis import Analysis
from capscale.report.betas import beta_rows
from capscale.report.records import jsonable
from capscale.report.records import records as _records
from capscale.report.sections import SECTIONS
from capscale.spectrum.summary import WELL_SAMPLED

FORMAT = "capscale.report"
FORMAT_VERSION = 2  # 2: answers, levels, β-difference intervals (changes since: docs/report-format.md)
# report.json keeps format 2's order of keys, so that files diff cleanly across versions; the parts of
# sections added since follow in SECTIONS order
_ORDER = (
    "format",
    "format_version",
    "generated",
    "sweep",
    "parameters",
    "versions",
    "betas",
    "levels",
    "q1_scaling",
    "q2_matched_loss",
    "q3_asymmetry",
    "q4_regimes",
    "training",
    "beta_trajectory",
    "reliability",
    "runs",
    "excluded_runs",
)


def report_data(a: Analysis) -> dict:
    """Everything the report shows, as plain JSON types."""
    p = a.params
    runs = a.sweep.runs
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sweep": {
            "name": title(a),
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
            "aggregation": f"median of the last {p.last_k} logged steps per layer within the final "
            f"{p.final_fraction:.0%} of each run (steps ≥ (1 − {p.final_fraction:g}) × its last logged step), "
            "then median over layers",
            "fit": "OLS of log rank on log width (seeds as replicate points), "
            f"{p.confidence:.0%} t-interval; bootstrap: percentile, {p.n_resamples} resamples",
        },
        "versions": _versions(),
        "betas": beta_rows(a),
        "levels": _records(a.levels),
        "reliability": {
            "low_nd": _records(a.low_nd),
            "n_aggregates": len(a.points),
            "well_sampled": WELL_SAMPLED,
        },
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
    for module in SECTIONS:
        data[module.KEY] = module.data(a)
    data = jsonable({**{k: data[k] for k in _ORDER if k in data}, **data})
    data["answers"] = [m.answer(data) for m in SECTIONS if hasattr(m, "answer")]
    data["summary"] = {"headline": data["q1_scaling"]["fits"], "findings": findings(data)}
    return data


def title(a: Analysis) -> str:
    """The sweep's own name; a single run directory is titled by the run's name, not its parent's."""
    if a.sweep.root is None and not a.sweep.spec and len(a.sweep.runs) == 1 and not len(a.sweep.excluded):
        return str(a.sweep.runs["name"].iloc[0])
    return a.sweep.name


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
    """Notes beside the answers, each computed from the data: measurement errors, sampling, runs left out."""
    out = []
    impossible = sum(r["n_runs"] for r in d["q3_asymmetry"]["region_counts"] if r["region"] == "impossible")
    if impossible:
        out.append(f"{impossible} run(s) fall in the impossible region R2 > R1: a measurement error.")
    low = d["reliability"]["low_nd"]
    if low:
        nd = d["reliability"]["well_sampled"]
        text = (
            f"Reliability: {len(low)} of {d['reliability']['n_aggregates']} aggregates rest on records "
            f"with N/D below {nd:g} (not well sampled); they are flagged in the tables."
        )
        worst = min(
            (r for r in low if r.get("min_samples_per_dim")), key=lambda r: r["min_samples_per_dim"], default=None
        )
        if worst is not None:
            factor = math.ceil(nd / worst["min_samples_per_dim"])
            text += (
                f" The fix: a telemetry window {factor}× longer (window= in capscale.attach / the callbacks, "
                f"telemetry.window in a sweep), so that every bucket gets ≥ {nd:g}·D samples: the worst, "
                f"{worst['bucket'].upper()} tokens at width {worst['width']}, has N/D = {worst['min_samples_per_dim']:.2g}."
            )
        out.append(text)
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
