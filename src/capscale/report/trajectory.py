"""β over training in the report: the ``beta_trajectory`` part of report.json, its figure and section.

The data are the analysis' ``beta_trajectory``, ``pair_trajectory`` and ``separation``
frames (``capscale.analysis.trajectories``); the section states, in one sentence per pair
of series, whether and from when their exponents separate (disjoint intervals).
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from capscale.analysis import Analysis
from capscale.analysis.pipeline import TRAJECTORY_RESAMPLES
from capscale.report.format import ND, Section, _get, _table, interval, num

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


def trajectory_data(a: Analysis) -> dict:
    """The ``beta_trajectory`` section of report.json (plain Python types; NaN stays float)."""

    def records(df, cols):
        return df[[c for c in cols if c in df.columns]].to_dict(orient="records")

    sep = a.separation
    return {
        "site": a.params.site,
        "confidence": a.params.confidence,
        "n_resamples": min(a.params.n_resamples, TRAJECTORY_RESAMPLES),
        "fits": records(a.beta_trajectory, _FIT_FIELDS),
        "pairs": records(a.pair_trajectory, _PAIR_FIELDS),
        "separation": [{**r, "sentence": sentence(r, a.beta_trajectory)} for r in sep.to_dict(orient="records")],
    }


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


def fig_beta_trajectory(a: Analysis) -> Figure | None:
    """β_soft and β_hard (headline site, all tokens) against tokens seen, with t-interval bands:
    one row per architecture and step budget (the series the report compares), coloured by
    optimizer label."""
    tr = a.beta_trajectory
    if tr.empty:
        return None
    tr = tr[(tr["site"] == a.params.site) & (tr["bucket"] == "all") & tr["fittable"].astype(bool)]
    if tr.empty:
        return None
    info = a.sweep.runs.drop_duplicates("series").set_index("series")
    labels = sorted(info["label"].unique())
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    cells = [
        (arch, steps, sorted(g.index))
        for (arch, steps), g in info[info.index.isin(tr["series"].unique())].groupby(["arch", "steps"], sort=True)
    ]
    fig = Figure(figsize=(10, 1.0 + 2.8 * len(cells)))
    axes = fig.subplots(len(cells), 2, squeeze=False)
    for row, (arch, steps, series) in zip(axes, cells):
        sel = tr[tr["series"].isin(series)]
        use_tokens = sel["tokens"].notna().all()
        x = "tokens" if use_tokens else "step"
        for ax, metric in zip(row, ("soft_rank", "hard_rank")):
            for name, g in sel[sel["metric"] == metric].groupby("series", sort=True):
                g = g.sort_values("step")
                c = colors[info.at[name, "label"]]
                ax.plot(g[x], g["beta"], color=c, lw=1.2, marker="o", ms=2.5, label=_plain(info.at[name, "label"]))
                lo, hi = g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                ax.fill_between(g[x].to_numpy(float)[ok], lo[ok], hi[ok], color=c, alpha=0.15, lw=0)
            cell = " · ".join(str(p) for p in (arch, f"{steps} steps") if p not in ("", None))
            ax.set_title(f"{_NAMES[metric]} ({a.params.site}, all tokens) · {_plain(cell)}", fontsize=9)
            ax.set_xlabel("tokens seen" if use_tokens else "step", fontsize=8)
            if use_tokens:
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M: no overlapping long ticks
            ax.axhline(0, color="#999", lw=0.6)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("β (band: 95% t-interval)" if a.params.confidence == 0.95 else "β (band: t-interval)")
        row[1].legend(fontsize=7, loc="best")
        lo, hi = np.nanpercentile(sel[["beta", "ci_low", "ci_high"]].to_numpy(float), [5, 95])
        for ax in row:  # a 1-dof interval must not flatten the rest
            ax.set_ylim(max(lo, -1.0) - 0.05, min(hi, 2.5) + 0.05)
    fig.tight_layout()
    return fig


def _plain(s: str) -> str:
    s = str(s).replace("$", r"\$")
    return "\u200b" + s if s.startswith("_") else s


def section(d: dict):
    """The report section: the sentences, the figure, and the table of β per series and step."""

    t = d.get("beta_trajectory") or {"fits": [], "separation": [], "pairs": []}
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
        ("series", _get("series")),
        ("step", _get("step")),
        ("tokens", lambda r: "—" if r["tokens"] is None else f"{int(r['tokens']):,}"),
        ("β", lambda r: _NAMES.get(r["metric"], r["metric"])),
        ("value", lambda r: num(r["beta"])),
        ("t-interval", lambda r: interval(r["ci_low"], r["ci_high"])),
        ("bootstrap", lambda r: interval(r["boot_low"], r["boot_high"])),
        (ND, _get("n_low_nd")),
    ]
    pairs = [p for p in t["pairs"] if p["site"] == site and p["bucket"] == "all"]
    pair_cols = [
        ("pair", lambda r: f"{r['series_a']} vs {r['series_b']}"),
        ("step", _get("step")),
        ("β", lambda r: f"β_{r['metric']}"),
        ("Δβ", lambda r: f"{num(r['dbeta'])} {interval(r['dbeta_low'], r['dbeta_high'])}"),
        ("level ratio", lambda r: f"{num(r['ratio'])} {interval(r['ratio_low'], r['ratio_high'])}"),
    ]
    return Section(
        "beta-trajectory",
        "β over training",
        text,
        ["beta_trajectory"],
        [
            _table(
                "β per series and step (also in report.json under 'beta_trajectory').",
                cols,
                fits,
                lambda r: not r["fittable"] or bool(r["n_low_nd"]),
                collapsed=True,
            ),
            _table(
                "Between series: Δβ = β_a − β_b and the level ratio (geometric mean over shared widths of rank_a / "
                "rank_b), each with its interval.",
                pair_cols,
                pairs,
                collapsed=True,
            ),
        ],
    )
