"""Question 1 — does added width become capacity, and does the optimizer change how much?
(``report.json`` key ``q1_scaling``; figures ``scaling`` and ``levels``).

β is the slope of log rank on log width per series; levels compare how much capacity two
optimizers realise at the same widths. Optimizers are compared within cells only
(``report.json`` ``design``), Holm-corrected over the levels and β of the headline bucket.
"""

from __future__ import annotations

from capscale.analysis import Analysis
from capscale.report.betas import beta_rows
from capscale.report.format import (
    Section,
    Table,
    beta_columns,
    beta_flag,
    get,
    interval,
    num,
    rank_name,
    resolved,
    table,
    widths,
)
from capscale.report.records import jsonable, records
from capscale.report.verdicts import (
    NOT_MEASURED,
    NOT_RESOLVED,
    RESOLVED,
    answer_for,
    excludes,
    f2,
    fittable,
    iv,
    min_seeds,
    pooled_clause,
    power_clause,
    series_treatment,
    span,
    within_cells,
)
from capscale.spectrum.summary import REPORT_METRICS

KEY = "q1_scaling"
FIGURES = ("scaling", "levels")


def data(a: Analysis) -> dict:
    return jsonable(
        {
            "site": a.params.site,
            "fits": beta_rows(a, a.params.site, "all"),
            "points": records(a.spread[a.spread["metric"].isin([m.name for m in REPORT_METRICS])]),
        }
    )


# -- the verdict ----------------------------------------------------------------------


def _level_text(r: dict, names: dict) -> str:
    return (
        f"{r['cell']}: {names.get(r['series'], r['series'])} {f2(r['ratio'])}× {iv(r['ratio_low'], r['ratio_high'])} "
        f"{names.get(r['baseline'], r['baseline'])}"
    )


def answer(d: dict) -> dict:
    fits = fittable(d[KEY]["fits"])
    fam = within_cells(d)
    levels, betas = fam["levels"], fam["betas"]
    if not fits and not levels:
        return answer_for("q1", NOT_MEASURED, "No series has ranks at 3 or more widths, so no β can be fitted.", [])
    if not levels and not betas:  # one treatment: does its rank grow with width?
        b = fits[0]["beta_hard"]
        grows = excludes(b["ci_low"], b["ci_high"], 0)
        text = f"{fits[0]['series']}: β_hard {f2(b['beta'])} {iv(b['ci_low'], b['ci_high'])}, " + (
            "rank grows with width" if grows else "growth with width not resolved"
        )
        if b.get("interval_over", "seeds") != "seeds":
            text += " (one seed: the interval is over widths only, not over seeds)"
        return answer_for("q1", RESOLVED if grows else NOT_RESOLVED, text + ".", ["scaling"])
    names = series_treatment(d)
    cells = sorted({r["cell"] for r in levels} | {r["cell"] for r in betas})
    parts = [
        f"Compared within {len(cells)} cell(s) (every factor but the optimizer equal), Holm-corrected over "
        f"{fam['family']} comparison(s) of hard-rank level and β_hard"
    ]
    if fam["level_hits"]:
        parts.append(
            f"the hard-rank level differs in {len(fam['level_hits'])} of {len(levels)}: "
            + "; ".join(_level_text(r, names) for r in fam["level_hits"])
        )
    elif levels:
        parts.append(
            f"no hard-rank level difference survives the correction (ratios {span([r['ratio'] for r in levels])}×)"
            + ("; one seed: level intervals are over widths only and decide nothing" if min_seeds(d) < 2 else "")
        )
    if fam["beta_hits"]:
        parts.append(
            f"β_hard differs in {len(fam['beta_hits'])} of {len(betas)}: "
            + "; ".join(
                f"{r['cell']}: {r['b']} − {r['a']} {f2(r['diff'])} {iv(r['low'], r['high'])}" for r in fam["beta_hits"]
            )
        )
    elif betas:
        parts.append(f"no β_hard difference survives it (Δβ_hard {span([r['diff'] for r in betas])})")
    pooled = pooled_clause(d, "hard_rank", "Δβ_hard")
    if pooled:
        parts.append(pooled)
    if betas:
        parts.append(power_clause(betas))
    verdict = RESOLVED if fam["level_hits"] or fam["beta_hits"] else NOT_RESOLVED
    return answer_for("q1", verdict, "; ".join(parts) + ".", list(FIGURES))


# -- the page -------------------------------------------------------------------------


def _ratio(r: dict) -> str:
    return f"{num(r['ratio'], 2)}× {interval(r['ratio_low'], r['ratio_high'], 2)}"


def _per_width(r: dict) -> str:
    return f"{num(r['ratio_min'], 2)}–{num(r['ratio_max'], 2)}×"


def _loss_diff(r: dict) -> str:
    return f"{num(r['loss_diff'], 3)} {interval(r['loss_diff_low'], r['loss_diff_high'])}"


def _not_resolved(r: dict) -> bool:
    return not r["resolved"]


def levels_table(d: dict) -> Table:
    rows = [r for r in d["levels"] if r["bucket"] == "all"]
    return table(
        "Rank ratios of pairs of series at matched widths, all tokens (higher over lower).",
        [
            ("series", get("series")),
            ("over", get("baseline")),
            ("rank", rank_name),
            ("ratio [CI]", _ratio),
            ("resolved", resolved),
            ("per width", _per_width),
            ("Δ loss (nats) [CI]", _loss_diff),
            ("widths", widths),
            ("seeds", get("n_seeds")),
        ],
        rows,
        _not_resolved,
        pinned=2,
        answer=3,
        collapsed=len(rows) > 12,
        empty="a single series: no pair to compare",
    )


def _spread(metric: str):
    def cell(r: dict) -> str:
        if metric not in r:
            return "—"
        m = r[metric]
        return f"{num(m['median'], 1)} [{num(m['min'], 1)}, {num(m['max'], 1)}]"

    return cell


def _seeds(r: dict) -> str:
    return num(r.get(REPORT_METRICS[0].name, {}).get("n_seeds"))


def _points(d: dict) -> list[dict]:
    """One row per series × site × width with each rank's spread over seeds (all tokens)."""
    names = [m.name for m in REPORT_METRICS]
    points: dict[tuple, dict] = {}
    for p in d[KEY]["points"]:
        if p["bucket"] == "all" and p["metric"] in names:
            points.setdefault((p["series"], p["site"], p["width"]), {})[p["metric"]] = p
    return [{"series": s, "site": site, "width": w, **v} for (s, site, w), v in sorted(points.items())]


def section(d: dict) -> Section:
    rows = [b for b in d["betas"] if b["bucket"] == "all"]
    return Section(
        "q1",
        "1. Does added width become capacity? Rank vs width, per optimizer",
        [
            (
                "Each run is aggregated to one rank per site and token bucket (the paper's rule, stated under Parameters); "
                "β is the OLS slope of log rank on log width over the runs of a series (seeds as replicate points). "
                "β = 1: every added unit of width becomes a variance-carrying direction; β < 1: capacity grows slower than "
                "width. The soft rank R1 counts directions carrying any variance, the hard rank R2 the directions the "
                "energy actually spreads over. {fig:scaling} shows the ranks and the fitted laws (with their "
                "confidence bands when the design has one cell; per cell otherwise, intervals in the tables)."
            ),
            (
                "β compares growth; levels compare how much capacity each series realises at the same width. "
                "{fig:levels} and the first table give each pair's rank ratio: the geometric mean over the widths "
                "both series ran, with a t-interval over widths (seed noise and any drift with width included). "
                "A ratio is resolved when its interval excludes 1×."
            ),
        ],
        list(FIGURES),
        [
            levels_table(d),
            table(
                "β per series and site, all tokens (t-interval and bootstrap interval).",
                beta_columns(False, True),
                rows,
                beta_flag,
            ),
            table(
                "Aggregated ranks per width: median over seeds [min, max].",
                [
                    ("series", get("series")),
                    ("site", get("site")),
                    ("width", get("width")),
                    *[(m.label, _spread(m.name)) for m in REPORT_METRICS],
                    ("seeds", _seeds),
                ],
                _points(d),
                collapsed=True,
            ),
        ],
    )
