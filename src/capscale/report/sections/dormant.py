"""Dormant units and effective-rank fall-off (``report.json`` key ``dormant``).

The dormant-unit fraction of each run at the end of training (the report's final aggregate:
median of the last logged steps per layer, then over layers; all tokens) per series × width ×
site, over seeds; and the largest fall-off of the hard rank between two consecutive windows and
the change of the dormant fraction over the run (``capscale.analysis.falloff``). Spectra written
before the ``dormant_frac`` column existed give ``{"shown": false, "why": ...}`` and no section.
"""

from __future__ import annotations

import numpy as np

from capscale.analysis import Analysis, falloff_summary, rank_falloff
from capscale.report.format import Section, get, num, table
from capscale.report.records import jsonable, records
from capscale.spectrum import DORMANT_REL_VARIANCE

KEY = "dormant"


def data(a: Analysis) -> dict:
    pts = a.points[a.points["bucket"] == "all"]
    if "dormant_frac" not in pts or not np.isfinite(pts["dormant_frac"].astype(float)).any():
        return {"shown": False, "why": "the spectra carry no dormant_frac (written before the column existed)"}
    info = a.sweep.runs[["run_id", "series", "width", "seed"]]
    pts = pts.merge(info, on="run_id")
    fo = falloff_summary(rank_falloff(a.sweep.spectra))
    fo = fo[fo["bucket"] == "all"].merge(info, on="run_id")
    end = (
        pts.groupby(["series", "width", "site"], sort=True)["dormant_frac"]
        .agg(median="median", low="min", high="max", n_seeds="count")
        .reset_index()
    )
    fall = (
        fo.groupby(["series", "width", "site"], sort=True)[["max_falloff_hard", "total_d_dormant"]]
        .median()
        .reset_index()
    )
    rows = end.merge(fall, on=["series", "width", "site"], how="left")
    return jsonable(
        {
            "shown": True,
            "site": a.params.site,
            "threshold": DORMANT_REL_VARIANCE,
            "method": (
                f"a unit is dormant when its variance in the window is at most {DORMANT_REL_VARIANCE:g} of the "
                "mean unit variance of its site (the covariance's diagonal); per run: the report's final aggregate "
                "(median of the last logged steps per layer, then over layers), all tokens; across seeds: median, "
                "min, max; fall-off: the largest drop of log hard rank (median over layers) between two consecutive "
                "windows, and the change of the dormant fraction from the first window to the last (median over seeds)"
            ),
            "rows": records(rows),
            "n_runs_with_dormant": int(
                np.isfinite(pts["dormant_frac"].astype(float)).groupby(pts["run_id"]).any().sum()
            ),
        }
    )


def section(d: dict) -> Section | None:
    q = d.get(KEY)
    if not q or not q.get("shown"):
        return None
    site = q["site"]
    rows = [r for r in q["rows"] if r["site"] == site]
    others = [r for r in q["rows"] if r["site"] != site]
    cols = [
        ("series", get("series")),
        ("width", get("width")),
        ("dormant at the end (median over seeds)", lambda r: num(r["median"])),
        ("seeds' range", lambda r: f"{num(r['low'])} – {num(r['high'])}"),
        ("seeds", get("n_seeds")),
        ("largest hard-rank fall-off (log)", lambda r: num(r.get("max_falloff_hard"))),
        ("dormant change over the run", lambda r: num(r.get("total_d_dormant"))),
    ]
    tables = [
        table(
            f"Dormant-unit fraction at the end of training, {site}-activation, all tokens (median over layers). "
            "Highlighted: a series × width with dormant units in every seed.",
            cols,
            rows,
            lambda r: r["low"] is not None and r["low"] > 0,
            answer=2,
        )
    ]
    if others:
        tables.append(table("The same at the other site.", [("site", get("site")), *cols], others, collapsed=True))
    return Section(
        "dormant",
        "Dormant units and effective-rank fall-off",
        [
            "The plasticity literature tracks the loss of active directions: units that stop varying, and an "
            f"effective rank that falls. A unit is dormant here when its variance is at most {q['threshold']:g} of "
            "its site's mean unit variance in the window (read from the covariance's diagonal, no eigendecomposition). "
            "The fall-off is the largest drop of the hard rank between two consecutive windows of a run.",
        ],
        [],
        tables,
    )
