"""β over training (``report.json`` key ``beta_trajectory``; figure ``beta_trajectory``).

The data are the analysis' ``beta_trajectory``, ``pair_trajectory`` and ``separation``
frames (``capscale.analysis.trajectories``); the section states, in one sentence per pair
of series, whether and from when their exponents separate (disjoint intervals).
"""

from __future__ import annotations

import math

from capscale.analysis import Analysis
from capscale.analysis.pipeline import TRAJECTORY_RESAMPLES
from capscale.report.format import ND, Section, get, interval, num, table
from capscale.report.records import jsonable

_FIT_FIELDS = [
    "series",
    "step",
    "tokens",
    "site",
    "bucket",
    "metric",
    "beta",
    "ci_low",
    "ci_high",
    "boot_low",
    "boot_high",
    "boot_over",
    "n",
    "n_widths",
    "n_seeds",
    "n_low_nd",
    "fittable",
]
_PAIR_FIELDS = [
    "series_a",
    "series_b",
    "step",
    "tokens",
    "site",
    "bucket",
    "metric",
    "dbeta",
    "dbeta_low",
    "dbeta_high",
    "ratio",
    "ratio_low",
    "ratio_high",
    "ratio_widths",
    "n_low_nd",
]
_NAMES = {"hard_rank": "β_hard", "soft_rank": "β_soft"}
KEY = "beta_trajectory"
FIGURES = ("beta_trajectory",)


def data(a: Analysis) -> dict:
    """The ``beta_trajectory`` section of report.json (plain Python types; NaN stays float)."""

    def records(df, cols):
        return df[[c for c in cols if c in df.columns]].to_dict(orient="records")

    sep = a.separation
    return jsonable(
        {
            "site": a.params.site,
            "confidence": a.params.confidence,
            "n_resamples": min(a.params.n_resamples, TRAJECTORY_RESAMPLES),
            "fits": records(a.beta_trajectory, _FIT_FIELDS),
            "pairs": records(a.pair_trajectory, _PAIR_FIELDS),
            "separation": [{**r, "sentence": sentence(r, a.beta_trajectory)} for r in sep.to_dict(orient="records")],
        }
    )


def _when(step, tokens: dict) -> str:
    t = tokens.get(step)
    return f"step {step}" if t is None or not math.isfinite(t) else f"step {step} ({int(t):,} tokens)"


def sentence(r: dict, traj) -> str:
    """One sentence: whether and when the two series' β separate (disjoint intervals)."""
    name = _NAMES.get(r["metric"], r["metric"])
    sel = traj[traj["series"] == r["series_a"]]
    tokens = dict(zip(sel["step"], sel["tokens"].astype(float)))
    head = f"{r['series_a']} vs {r['series_b']}, {name} ({r['site']}-activation, {r['bucket']} tokens): "
    steps, sep = list(r["steps"]), list(r["separated"])
    skipped = f"; {r['n_skipped']} step(s) left out (not fittable or N/D < 10)" if r["n_skipped"] else ""
    if not steps:
        return head + "no step where both fits are fittable and well sampled" + skipped + "."
    span = f"steps {steps[0]}–{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
    if not sep:
        return head + f"the intervals overlap at every one of the {len(steps)} compared {span}" + skipped + "."
    last = (
        f"{r['higher']} higher at the last ({r['beta_a_last']:.2f} vs {r['beta_b_last']:.2f})"
        if r["higher"] == r["series_a"]
        else f"{r['higher']} higher at the last ({r['beta_b_last']:.2f} vs {r['beta_a_last']:.2f})"
    )
    if r["at_end"] and sep == steps[steps.index(sep[0]) :]:
        return (
            head
            + f"separate from {_when(sep[0], tokens)} on, through {_when(steps[-1], tokens)}; {last}"
            + skipped
            + "."
        )
    end = "still apart" if r["at_end"] else "not apart"
    return (
        head
        + f"separate at {len(sep)} of {len(steps)} compared steps, first at {_when(sep[0], tokens)}, "
        + f"{end} at the last ({_when(steps[-1], tokens)}); {last}"
        + skipped
        + "."
    )


def _tokens(r: dict) -> str:
    return "—" if r["tokens"] is None else f"{int(r['tokens']):,}"


def _beta_name(r: dict) -> str:
    return _NAMES.get(r["metric"], r["metric"])


def _value(r: dict) -> str:
    return num(r["beta"])


def _t_interval(r: dict) -> str:
    return interval(r["ci_low"], r["ci_high"])


def _boot(r: dict) -> str:
    return interval(r["boot_low"], r["boot_high"])


def _unusable(r: dict) -> bool:
    return not r["fittable"] or bool(r["n_low_nd"])


def _pair(r: dict) -> str:
    return f"{r['series_a']} vs {r['series_b']}"


def _pair_metric(r: dict) -> str:
    return f"β_{r['metric']}"


def _dbeta(r: dict) -> str:
    return f"{num(r['dbeta'])} {interval(r['dbeta_low'], r['dbeta_high'])}"


def _level_ratio(r: dict) -> str:
    return f"{num(r['ratio'])} {interval(r['ratio_low'], r['ratio_high'])}"


def section(d: dict) -> Section:
    """The report section: the sentences, the figure, and the table of β per series and step."""

    t = d.get(KEY) or {"fits": [], "separation": [], "pairs": []}
    site = t.get("site", d["parameters"]["site"])
    fits = [f for f in t["fits"] if f["site"] == site and f["bucket"] == "all" and f["metric"] != "delta_beta"]
    text = [
        "β fitted at every logged step that all widths of a series share (each run's ranks of that one step, "
        "median over layers; seeds as replicate points), against tokens seen ({fig:beta_trajectory}). Two series "
        f"separate at a step when their t-intervals are disjoint; steps where either fit uses a record with {ND} "
        "are left out. "
        f"Bootstrap intervals here use {t.get('n_resamples', '—')} resamples per fit."
    ]
    text += [r["sentence"] for r in t["separation"]] or ["No two series share an architecture and a step budget."]
    cols = [
        ("series", get("series")),
        ("step", get("step")),
        ("tokens", _tokens),
        ("β", _beta_name),
        ("value", _value),
        ("t-interval", _t_interval),
        ("bootstrap", _boot),
        (ND, get("n_low_nd")),
    ]
    pairs = [p for p in t["pairs"] if p["site"] == site and p["bucket"] == "all"]
    pair_cols = [
        ("pair", _pair),
        ("step", get("step")),
        ("β", _pair_metric),
        ("Δβ", _dbeta),
        ("level ratio", _level_ratio),
    ]
    return Section(
        "beta-trajectory",
        "β over training",
        text,
        list(FIGURES),
        [
            table(
                "β per series and step (also in report.json under 'beta_trajectory').",
                cols,
                fits,
                _unusable,
                collapsed=True,
            ),
            table(
                "Between series: Δβ = β_a − β_b and the level ratio (geometric mean over shared widths of rank_a / "
                "rank_b), each with its interval.",
                pair_cols,
                pairs,
                collapsed=True,
            ),
        ],
    )
