"""Treatment contrasts within cells: Δβ = β(b) − β(a), the seed as the unit of replication.

For every series and seed, β is the OLS slope of log rank on log width over that seed's
runs (≥ 3 widths; ``seed_betas``). Within a cell (``design``: every factor but the
treatment equal) each pair of treatments gets the difference of their mean β over seeds
with a Welch t-interval over seeds (``power.welch``): with one seed a side there is no
interval, and the row says so. Each row also states the minimum detectable difference at
80% power, the interval's bounds as the differences the data exclude, and — when the
paper gives both optimizers' β — whether the data exclude the paper's gap.

Several cells answer one question, so the rows of one family (site × bucket × metric
[× layer]) carry Holm-adjusted p-values; ``resolved`` is Holm-adjusted p < 1 − confidence,
and ``mde_holm`` the difference a row needs to be resolved so (``power.mde_holm``).
Across cells the differences are pooled by a fixed-effect inverse-variance mean with its
heterogeneity (``pooled_contrasts``); no row is ever picked for being the largest.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from capscale.analysis.design import natural_key
from capscale.analysis.power import holm, mde_holm, pooled, reference_gap, welch

METRICS = ("soft_rank", "hard_rank", "delta_beta")
MIN_WIDTHS = 3


def _log_values(frame: pd.DataFrame, metric: str) -> pd.Series:
    v = frame["soft_rank"] / frame["hard_rank"] if metric == "delta_beta" else frame[metric]
    v = v.astype(float)
    return np.log(v.where(v > 0))


def seed_betas(points: pd.DataFrame, runs: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per series × seed × site × bucket (× ``by``, e.g. layer) × metric: ``beta`` over that seed's widths."""
    info = runs[["run_id", "series", "treatment", "cell", "optimizer", "width", "seed"]]
    pts = points.merge(info, on="run_id")
    keys = ["series", "treatment", "cell", "optimizer", "seed", "site", "bucket", *by]
    parts = []
    for metric in METRICS:
        y = _log_values(pts, metric)
        ok = np.isfinite(y)
        g = pts.loc[ok, keys].assign(x=np.log(pts.loc[ok, "width"].astype(float)), y=y[ok])
        g = g.assign(xx=g["x"] ** 2, xy=g["x"] * g["y"])
        grouped = g.groupby(keys, sort=True)
        s = grouped[["x", "y", "xx", "xy"]].sum()
        n = grouped.size()
        sxx = s["xx"] - s["x"] ** 2 / n
        beta = (s["xy"] - s["x"] * s["y"] / n) / sxx.where(sxx > 0)
        widths = grouped["x"].nunique()
        frame = pd.DataFrame({"metric": metric, "beta": beta.where(widths >= MIN_WIDTHS), "n_widths": widths})
        parts.append(frame.reset_index())
    return pd.concat(parts, ignore_index=True)


def cell_contrasts(betas: pd.DataFrame, confidence: float = 0.95, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per site × bucket × metric (× ``by``) × cell × pair of treatments (b − a, a < b by name)."""
    alpha = 1 - confidence
    rows = []
    family = ["site", "bucket", "metric", *by]
    for key, fam in betas.groupby(family, sort=True):
        for cell, g in fam.groupby("cell", sort=True):
            ok = g[np.isfinite(g["beta"])]
            per = {t: s for t, s in ok.groupby("treatment")}
            for a, b in itertools.combinations(sorted(per), 2):
                d = welch(per[a]["beta"], per[b]["beta"], confidence)
                ref = reference_gap(per[a]["optimizer"].iloc[0], per[b]["optimizer"].iloc[0], _ref_metric(key[2]))
                row = {**dict(zip(family, key)), "cell": cell, "a": a, "b": b}
                row.update(
                    beta_a=float(per[a]["beta"].mean()),
                    beta_b=float(per[b]["beta"].mean()),
                    **d.to_dict(),
                    reference=ref,
                    excludes_reference=None
                    if ref is None or not math.isfinite(d.low)
                    else bool(not d.low <= ref <= d.high),
                )
                rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["holm_p"] = np.nan
    out["family_size"] = 0
    for _, idx in out.groupby(family, sort=False).groups.items():
        adj = holm(out.loc[idx, "p"])
        out.loc[idx, "holm_p"] = adj
        out.loc[idx, "family_size"] = int(np.isfinite(out.loc[idx, "p"]).sum())
    # what a comparison needs to survive Holm (its first step, α/m), beside the uncorrected ``mde``
    out["mde_holm"] = [
        mde_holm(se, df, m, alpha) if math.isfinite(p) else math.nan
        for se, df, m, p in zip(out["se"], out["df"], out["family_size"], out["p"])
    ]
    out["resolved"] = out["holm_p"] < alpha
    order = sorted(
        range(len(out)), key=lambda i: (*(str(out.at[i, k]) for k in family), natural_key(out.at[i, "cell"]))
    )
    return out.iloc[order].reset_index(drop=True)


def _ref_metric(metric: str) -> str:
    return metric if metric in ("soft_rank", "hard_rank") else "delta_beta"


def pooled_contrasts(contrasts: pd.DataFrame, confidence: float = 0.95, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per site × bucket × metric (× ``by``) × pair of treatments: the fixed-effect pooled Δβ over cells."""
    if contrasts.empty:
        return pd.DataFrame()
    rows = []
    keys = ["site", "bucket", "metric", *by, "a", "b"]
    for key, g in contrasts.groupby(keys, sort=True):
        p = pooled(g["diff"], g["se"], confidence)
        rows.append({**dict(zip(keys, key)), "n_cells_total": len(g), **p})
    return pd.DataFrame(rows)
