"""Shared formatting of the report's pages: table and section types, number, interval and β cells.

Every section module (``capscale.report.sections``) and the page assembly (``layout``) import
these; this module imports nothing of the report, so no section depends on another.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capscale.spectrum.summary import WELL_SAMPLED

ND = f"N/D < {WELL_SAMPLED:g}"  # the flag for aggregates that are not well sampled
FIG_REF = re.compile(r"\{fig:([a-z_]+)\}")


@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[list[str]]
    flagged: list[bool] = field(default_factory=list)  # rows to highlight (low N/D, not fittable, ...)
    collapsed: bool = False  # long detail tables start folded
    empty: str = "none"
    pinned: int = 1  # leading columns kept in view when a wide table scrolls
    answer: int = 0  # the column that answers the table's question (kept first, or pinned)


@dataclass
class Section:
    anchor: str
    title: str
    text: list[str]
    figures: list[str]
    tables: list[Table]


# -- cell formatting ---------------------------------------------------------------


def num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def interval(lo: Any, hi: Any, digits: int = 3) -> str:
    return "—" if lo is None or hi is None else f"[{num(lo, digits)}, {num(hi, digits)}]"


def table(
    caption: str,
    columns: list[tuple[str, Callable[[dict], str]]],
    rows: list[dict],
    flag: Callable[[dict], bool] | None = None,
    **kw,
) -> Table:
    return Table(
        caption=caption,
        headers=[h for h, _ in columns],
        rows=[[f(r) for _, f in columns] for r in rows],
        flagged=[bool(flag(r)) for r in rows] if flag else [],
        **kw,
    )


def get(key: str, digits: int = 3) -> Callable[[dict], str]:
    return lambda r: num(r.get(key), digits) if not isinstance(r.get(key), str) else r[key]


# -- β cells: a row of report.json's ``betas`` (beta_soft / beta_hard / beta_delta, each with its intervals)


def beta(b: dict) -> str:
    """'0.661 [0.546, 0.775]', or 'not fittable' (the reason goes in the notes column)."""
    return f"{num(b['beta'])} {interval(b['ci_low'], b['ci_high'])}" if b["fittable"] else "not fittable"


def boot(b: dict) -> str:
    if not b["fittable"] or b["boot_low"] is None:
        return "—"
    return f"{interval(b['boot_low'], b['boot_high'])} over {b['boot_over']}"


def beta_notes(row: dict) -> str:
    reasons = {row[k]["reason"] for k in ("beta_soft", "beta_hard") if row[k]["reason"]}
    low = row["beta_hard"]["n_low_nd"]
    if low:
        reasons.add(f"{low} point(s) with {ND}")
    return "; ".join(sorted(reasons))


def beta_flag(row: dict) -> bool:
    """Highlight a β row: β_hard not fittable, or fitted on a record that is not well sampled."""
    return not row["beta_hard"]["fittable"] or bool(row["beta_hard"]["n_low_nd"])


def _site(r: dict) -> str:
    return r["site"]


def _series(r: dict) -> str:
    return r["series"]


def _tokens(r: dict) -> str:
    return r["bucket"].upper()


def _soft(r: dict) -> str:
    return beta(r["beta_soft"])


def _soft_boot(r: dict) -> str:
    return boot(r["beta_soft"])


def _hard(r: dict) -> str:
    return beta(r["beta_hard"])


def _hard_boot(r: dict) -> str:
    return boot(r["beta_hard"])


def _delta(r: dict) -> str:
    return beta(r["beta_delta"])


def _r2(r: dict) -> str:
    return f"{num(r['beta_soft']['r2'])} / {num(r['beta_hard']['r2'])}"


def _n(r: dict) -> str:
    return num(r["beta_soft"]["n"])


def beta_columns(with_bucket: bool, with_site: bool) -> list[tuple[str, Callable[[dict], str]]]:
    """The columns of a table of β rows: series (site, tokens), β_soft, β_hard and Δβ with intervals, R², n."""
    cols = [("series", _series)]
    if with_site:
        cols.append(("site", _site))
    if with_bucket:
        cols.append(("tokens", _tokens))
    cols += [
        ("β_soft [95% CI]", _soft),
        ("β_soft bootstrap", _soft_boot),
        ("β_hard [95% CI]", _hard),
        ("β_hard bootstrap", _hard_boot),
        ("Δβ [95% CI]", _delta),
        ("R² soft / hard", _r2),
        ("n", _n),
        ("notes", beta_notes),
    ]
    return cols


# -- cells of a comparison row (report.json's contrasts, levels and alike) ----------------


def pair(r: dict) -> str:
    """'b − a': the two treatments of a difference, in the order it is taken."""
    return f"{r['b']} − {r['a']}"


def diff_ci(r: dict) -> str:
    return f"{num(r['diff'], 3)} {interval(r['low'], r['high'])}"


def seeds_ab(r: dict) -> str:
    """'3 / 3', with the row's note when it has one (e.g. one seed: no interval)."""
    return f"{r['n_a']} / {r['n_b']}" + (f" ({r['note']})" if r.get("note") else "")


def resolved(r: dict) -> str:
    return "yes" if r["resolved"] else "no"


def no_interval(r: dict) -> bool:
    return r["low"] is None


def rank_name(r: dict) -> str:
    return {"soft_rank": "R1", "hard_rank": "R2"}[r["metric"]]


def widths(r: dict) -> str:
    return ", ".join(str(w) for w in r["widths"])


def num_of(key: str, digits: int = 3) -> Callable[[dict], str]:
    """A cell: ``num`` of the row's ``key`` (``get`` passes strings through; this never does)."""

    def cell(r: dict) -> str:
        return num(r.get(key), digits)

    return cell


# the names the older modules use
_table, _get = table, get
