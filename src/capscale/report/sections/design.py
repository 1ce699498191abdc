"""The study's design and the optimizer's effect on β within each cell (``report.json`` key ``design``).

Cells, factors and treatment come from ``analysis.design``; the contrasts (Δβ over seeds,
Holm over the cells, minimum detectable difference, what the data exclude, the paper's
gap) from ``analysis.contrasts``. The Q1 and Q4 verdicts read this part of report.json.
"""

from __future__ import annotations

from capscale.analysis import Analysis
from capscale.analysis.power import POWER
from capscale.report.format import (
    Section,
    diff_ci,
    get,
    interval,
    no_interval,
    num,
    num_of,
    pair,
    resolved,
    seeds_ab,
    table,
    widths,
)
from capscale.report.records import jsonable, records

KEY = "design"
_METRIC = {"hard_rank": "β_hard", "soft_rank": "β_soft", "delta_beta": "Δβ (soft − hard)"}


def data(a: Analysis) -> dict:
    conf = a.params.confidence
    return jsonable(
        {
            **a.design.to_dict(),
            "site": a.params.site,
            "confidence": conf,
            "power": POWER,
            "method": (
                "β per series and seed: OLS slope of log rank on log width over that seed's widths; "
                "Δβ = mean over seeds of β(b) − mean over seeds of β(a), Welch t-interval over seeds "
                f"({conf:.0%}); p-values Holm-adjusted over the cells (and pairs) of one site × bucket × metric; "
                f"minimum detectable difference at {POWER:.0%} power, two-sided, level {1 - conf:.2g}; "
                "pooled over cells by a fixed-effect inverse-variance mean (normal interval) with Cochran's Q and I²"
            ),
            "contrasts": records(a.contrasts),
            "pooled": records(a.pooled),
        }
    )


def contrast_text(r: dict, digits: int = 2) -> str:
    """'Δβ_hard muon − adamw = 0.12 [−0.20, 0.44] (3 vs 3 seeds; MDE 0.45; excludes > 0.44 and < −0.20)'."""
    head = f"{num(r['diff'], digits)} {interval(r['low'], r['high'], digits)}"
    if r["low"] is None:
        return f"{num(r['diff'], digits)} ({r.get('note') or 'no interval'})"
    shown = r.get("mde_holm") is not None and num(r["mde_holm"], digits) != num(r["mde"], digits)
    holm = f", {num(r['mde_holm'], digits)} at Holm's α/m" if shown else ""
    return f"{head}, MDE {num(r['mde'], digits)}{holm}"


def _reference(r: dict) -> str:
    if r.get("reference") is None:
        return "—"
    if r.get("excludes_reference") is None:
        return f"{num(r['reference'], 2)}: no interval"
    return f"{num(r['reference'], 2)}: {'excluded' if r['excludes_reference'] else 'not excluded'}"


def _metric(r: dict) -> str:
    return _METRIC.get(r["metric"], r["metric"])


def _excluded(r: dict) -> str:
    return "—" if r["low"] is None else f"< {num(r['low'], 2)} and > {num(r['high'], 2)}"


def _treatments(r: dict) -> str:
    return ", ".join(r["treatments"])


def _bucket(r: dict) -> str:
    return r["bucket"].upper()


def _pooled(r: dict) -> str:
    return f"{num(r.get('diff'), 3)} {interval(r.get('low'), r.get('high'))}"


def _cells(r: dict) -> str:
    return f"{r['n_cells']} of {r['n_cells_total']}"


def _rows(q: dict, bucket: str, metrics: tuple[str, ...]) -> list[dict]:
    return [r for r in q["contrasts"] if r["site"] == q["site"] and r["bucket"] == bucket and r["metric"] in metrics]


def _contrast_table(q: dict, rows: list[dict], caption: str, collapsed: bool = False):
    cols = [
        ("cell", get("cell")),
        ("β", _metric),
        ("b − a", pair),
        ("difference [CI]", diff_ci),
        (f"MDE ({q['power']:.0%} power)", num_of("mde")),
        ("MDE at α/m (Holm)", num_of("mde_holm")),
        ("data exclude", _excluded),
        ("paper's gap", _reference),
        ("Holm p", num_of("holm_p")),
        ("resolved", resolved),
        ("seeds a / b", seeds_ab),
    ]
    return table(caption, cols, rows, no_interval, collapsed=collapsed or len(rows) > 24, pinned=1, answer=3)


def section(d: dict) -> Section | None:
    q = d.get(KEY)
    if not q:
        return None
    factors = ", ".join(q["factors"]) or "none"
    cells = table(
        "Cells: every factor but the treatment equal.",
        [
            ("cell", get("cell")),
            ("treatments", _treatments),
            ("runs", get("n_runs")),
            ("widths", widths),
            ("seeds", get("n_seeds")),
        ],
        q["cells"],
        collapsed=len(q["cells"]) > 12,
    )
    pooled = table(
        "Pooled over cells (fixed-effect inverse-variance mean; I²: share of the spread between cells "
        "beyond chance). A large I² means the cells disagree and the pooled value describes none of them.",
        [
            ("β", _metric),
            ("bucket", _bucket),
            ("b − a", pair),
            ("pooled [CI]", _pooled),
            ("cells", _cells),
            ("I²", num_of("i2", 2)),
            ("Q p", num_of("q_p")),
        ],
        [r for r in q["pooled"] if r["site"] == q["site"]],
        collapsed=True,
    )
    all_rows = _rows(q, "all", ("hard_rank", "soft_rank", "delta_beta"))
    by_bucket = [r for b in ("head", "mid", "tail") for r in _rows(q, b, ("hard_rank",))]
    return Section(
        "design",
        "The design: cells, and the optimizer's effect on β within each",
        [
            (
                f"Every config field that varies across the analysed runs is a factor ({factors}); the optimizer "
                "label is the treatment; the other factors define the cells. Treatments are compared only "
                "within a cell, so every comparison shares the step budget, model and data."
            ),
            (
                "The seed is the unit of replication: β is fitted per seed over the widths, and a difference of β "
                "gets a Welch interval over seeds (with one seed there is no interval, and the row says so). "
                "Several cells answer one question, so each row's p-value is Holm-adjusted over the cells; "
                "'resolved' means Holm p below the level. 'MDE' is the smallest difference the design would "
                f"detect with {q['power']:.0%} power; 'data exclude' gives the differences outside the interval; "
                "'paper's gap' says whether the paper's published difference of the same two optimizers "
                "(160M, post-activation, all tokens) lies outside it."
            ),
        ],
        [],
        [
            cells,
            _contrast_table(q, all_rows, f"Within-cell differences of β, {q['site']}-activation, all tokens."),
            pooled,
            _contrast_table(
                q, by_bucket, f"Within-cell differences of β_hard per token regime, {q['site']}-activation.", True
            ),
        ],
    )
