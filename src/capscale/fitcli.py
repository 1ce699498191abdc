"""``capscale fit POINTS.csv``: refit rank ∝ width^β to a CSV of (width, rank) points.

One fit per group, the groups being the distinct combinations of the other
non-numeric columns (e.g. ``optimizer_variant × metric`` in the paper's published
points), or of the columns named with ``--by``. A text column that identifies points
(each of its values at one width only: a ``run`` or ``path`` column) is not a group:
grouping by it would leave every group one width; it is named on stderr. Other numeric columns (a seed, a
layer) are pooled as replicate points. Prints one row per group — β, its t-interval,
R², n — the paper's method (``capscale.spectrum.fit_power_law``), so published or
foreign results can be refit and compared. A group with fewer than 3 widths is
reported as not fittable. Rows whose width or rank is missing or not finite
(NaN, ±Inf) are left out of their group's fit, and its note says how many.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from capscale.spectrum import fit_power_law


def fit_table(
    points: pd.DataFrame, x: str = "width", y: str = "value", by: list[str] | None = None, confidence: float = 0.95
) -> pd.DataFrame:
    """One row per group: the group's columns, then beta, ci_low, ci_high, r2, n, note."""
    missing = [c for c in (x, y, *(by or [])) if c not in points.columns]
    if missing:
        raise ValueError(f"column(s) {missing} not in the CSV; its columns are {list(points.columns)}")
    if points.empty:
        raise ValueError(f"the CSV has columns {list(points.columns)} but no rows")
    for col in (x, y):
        if not pd.api.types.is_numeric_dtype(points[col]):
            raise ValueError(f"column {col!r} must be numeric (got values like {points[col].iloc[0]!r})")
    if by is None:
        text = [c for c in points.columns if c not in (x, y) and not pd.api.types.is_numeric_dtype(points[c])]
        by = [c for c in text if c not in identifier_columns(points, x, text)]
    rows = []
    groups = points.groupby(by, sort=True, dropna=False) if by else [((), points)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        finite = np.isfinite(g[x].to_numpy(float)) & np.isfinite(g[y].to_numpy(float))
        dropped = (
            f"{int((~finite).sum())} row(s) with a missing or non-finite {x}/{y} left out" if not finite.all() else ""
        )
        g = g[finite]
        try:
            fit = fit_power_law(g[x], g[y], confidence)
            row.update(beta=fit.beta, ci_low=fit.ci_low, ci_high=fit.ci_high, r2=fit.r2, n=fit.n, note=dropped)
        except ValueError as exc:  # < 3 widths, non-positive values: this group only
            note = "; ".join(filter(None, [f"not fittable: {exc}", dropped]))
            row.update(beta=math.nan, ci_low=math.nan, ci_high=math.nan, r2=math.nan, n=len(g), note=note)
        rows.append(row)
    return pd.DataFrame(rows)


def identifier_columns(points: pd.DataFrame, x: str = "width", columns: list[str] | None = None) -> list[str]:
    """The text columns that identify points rather than group them: each value at one width only,
    while the data has several (a run name, a path). Grouping by one leaves nothing fittable."""
    if points[x].nunique() < 2:
        return []
    columns = columns if columns is not None else [c for c in points.columns if c != x]
    return [c for c in columns if points.groupby(c, dropna=False)[x].nunique().max() <= 1]


def format_table(table: pd.DataFrame, digits: int = 3, confidence: float = 0.95) -> str:
    """Plain-text table: group columns, β, interval, R², n (and a note where a group is not fittable)."""

    def num(v):
        return "—" if pd.isna(v) else f"{v:.{digits}f}"

    shown = table.drop(columns=["beta", "ci_low", "ci_high", "r2", "n", "note"]).astype(str)
    shown["β"] = table["beta"].map(num)
    shown[f"{confidence:.0%} interval"] = [
        "—" if pd.isna(lo) else f"[{num(lo)}, {num(hi)}]" for lo, hi in zip(table["ci_low"], table["ci_high"])
    ]
    shown["R²"] = table["r2"].map(num)
    shown["n"] = table["n"].astype(int).astype(str)
    if table["note"].astype(bool).any():
        shown["note"] = table["note"]
    return shown.to_string(index=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("points", metavar="POINTS.csv", help="CSV with a width column, a rank column and groups")
    parser.add_argument("--x", default="width", help="width column (default: width)")
    parser.add_argument("--y", default="value", help="rank column (default: value)")
    parser.add_argument(
        "--by", nargs="+", metavar="COL", default=None, help="group columns (default: every other non-numeric column)"
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="t-interval level (default 0.95)")
    parser.add_argument("--digits", type=int, default=3, help="decimals printed (default 3)")
    parser.add_argument("--out", metavar="FILE.csv", default=None, help="also write the table at full precision")


def run(args: argparse.Namespace) -> int:
    path = Path(args.points)
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.digits < 0:
        raise ValueError(f"--digits must be >= 0, got {args.digits}")
    if not path.is_file():
        raise FileNotFoundError(f"no such points file: {path}")
    try:
        points = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable CSV: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if args.by is None and args.x in points.columns:
        text = [c for c in points.columns if c not in (args.x, args.y) and not pd.api.types.is_numeric_dtype(points[c])]
        ids = identifier_columns(points, args.x, text)
        if ids:
            print(f"not grouped by {ids}: each value is at one width (name groups with --by)", file=sys.stderr)
    try:
        table = fit_table(points, args.x, args.y, args.by, args.confidence)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    print(format_table(table, args.digits, args.confidence))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0
