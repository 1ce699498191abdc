"""Shared formatting of the report's pages: table and section types, number and interval cells.

Every section module (``capscale.report.sections``, ``layout``, ``trajectory``) imports these;
this module imports nothing of the report, so no section depends on another.
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


# the names the older modules use
_table, _get = table, get
