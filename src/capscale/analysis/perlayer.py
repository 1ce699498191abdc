"""Per-layer scaling, the depth × optimizer interaction, and lack of fit of each power law.

The median over layers can hide layers that disagree (in cpu-long, layer 0 and layer 1 of
the same runs move in opposite directions). Here each layer is fitted on its own:

- ``layer_betas``: per series × site × bucket × layer × metric, β as the mean over seeds of
  the per-seed slope (``contrasts.seed_betas`` on the per-layer aggregates) with a
  t-interval over seeds (none with one seed);
- ``layer_contrasts``: Δβ per layer within each cell (``contrasts.cell_contrasts``: Welch
  over seeds, Holm over the cells of one site × bucket × metric × layer);
- ``interaction``: for cells that differ only in ``model.n_layer`` (depth), the change of the
  treatments' Δβ from the shallower to the deeper cell, with a Welch–Satterthwaite interval;
- ``lack_of_fit``: per series × site × bucket × metric, the pure-error F-test of the power
  law (seeds at one width are replicates): a small p says log rank is not linear in log
  width, so β summarises a curve.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from capscale.analysis.contrasts import cell_contrasts, seed_betas
from capscale.analysis.levels import mean_interval
from capscale.analysis.power import from_estimate

DEPTH = "n_layer"


def _by(per_layer: pd.DataFrame) -> tuple[str, ...]:
    stacked = "stack" in per_layer.columns and (per_layer["stack"].fillna("") != "").any()
    return ("stack", "layer") if stacked else ("layer",)


def layer_seed_betas(per_layer: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    by = _by(per_layer)
    return seed_betas(per_layer, runs, by=by), by


def layer_betas(seed_betas_: pd.DataFrame, by: tuple[str, ...], confidence: float = 0.95) -> pd.DataFrame:
    """Per series × site × bucket × layer × metric: mean β over seeds, t-interval over seeds, n_seeds."""
    keys = ["series", "treatment", "cell", "site", "bucket", *by, "metric"]
    rows = []
    for key, g in seed_betas_.groupby(keys, sort=True):
        vals = g["beta"].to_numpy(dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        m, lo, hi = mean_interval(vals, confidence) if len(vals) else (math.nan,) * 3
        rows.append({**dict(zip(keys, key)), "beta": m, "low": lo, "high": hi, "n_seeds": len(vals)})
    return pd.DataFrame(rows)


def layer_contrasts(seed_betas_: pd.DataFrame, by: tuple[str, ...], confidence: float = 0.95) -> pd.DataFrame:
    return cell_contrasts(seed_betas_, confidence, by=by)


def interaction(contrasts: pd.DataFrame, cells: pd.DataFrame, confidence: float = 0.95, factor: str = DEPTH):
    """Δβ(deeper cell) − Δβ(shallower cell) for cells equal in every shown factor but ``factor``.

    ``contrasts``: ``cell_contrasts`` rows (any ``by`` columns are kept as keys); ``cells``: the
    design's cell table (one column per shown factor, by short name).
    """
    if factor not in cells.columns or contrasts.empty:
        return pd.DataFrame()
    others = [c for c in cells.columns if c not in ("cell", "treatments", "n_runs", "widths", "n_seeds", factor)]
    level = dict(zip(cells["cell"], cells[factor]))
    keys = [c for c in contrasts.columns if c in ("site", "bucket", "metric", "stack", "layer")] + ["a", "b"]
    rows = []
    groups = cells.groupby(others, sort=True) if others else [((), cells)]
    for _, g in groups:
        names = sorted(g["cell"], key=lambda c: float(level[c]))
        for shallow, deep in itertools.combinations(names, 2):
            lo_rows = contrasts[contrasts["cell"] == shallow].set_index(keys)
            hi_rows = contrasts[contrasts["cell"] == deep].set_index(keys)
            for key in lo_rows.index.intersection(hi_rows.index):
                s, t = lo_rows.loc[key], hi_rows.loc[key]
                row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
                row.update(
                    factor=factor, shallow=shallow, deep=deep, level_shallow=level[shallow], level_deep=level[deep]
                )
                row.update(delta_shallow=s["diff"], delta_deep=t["diff"])
                if all(math.isfinite(x) for x in (s["se"], t["se"], s["df"], t["df"])):
                    se = math.hypot(s["se"], t["se"])
                    df = se**4 / (s["se"] ** 4 / s["df"] + t["se"] ** 4 / t["df"]) if se > 0 else math.inf
                    row.update(from_estimate(t["diff"] - s["diff"], se, df, confidence).to_dict())
                else:
                    row.update(diff=t["diff"] - s["diff"], low=math.nan, high=math.nan, note="no interval over seeds")
                rows.append(row)
    return pd.DataFrame(rows)


def lack_of_fit(points: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per series × site × bucket × metric: pure-error F-test of log R = β log D + c (needs replicates)."""
    pts = points.merge(runs[["run_id", "series", "width"]], on="run_id")
    rows = []
    for (series, site, bucket), g in pts.groupby(["series", "site", "bucket"], sort=True):
        for metric in ("soft_rank", "hard_rank"):
            v = g[metric].astype(float)
            ok = np.isfinite(v) & (v > 0)
            x, y, w = np.log(g["width"][ok].astype(float)), np.log(v[ok]), g["width"][ok]
            n, k = len(y), w.nunique()
            row = {"series": series, "site": site, "bucket": bucket, "metric": metric, "n": n, "n_widths": k}
            if k < 3 or n - k < 1:
                rows.append({**row, "f": math.nan, "p": math.nan, "note": "needs >= 3 widths and a replicate"})
                continue
            slope, intercept = np.polyfit(x, y, 1)
            ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
            ss_pe = float(((y - y.groupby(w).transform("mean")) ** 2).sum())
            ss_lof = max(ss_res - ss_pe, 0.0)
            df_lof, df_pe = k - 2, n - k
            if ss_pe <= 0:
                rows.append({**row, "f": math.nan, "p": math.nan, "note": "no spread between replicates"})
                continue
            f = (ss_lof / df_lof) / (ss_pe / df_pe)
            rows.append({**row, "f": f, "p": float(stats.f.sf(f, df_lof, df_pe)), "note": None})
    return pd.DataFrame(rows)
