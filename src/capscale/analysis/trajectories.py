"""Over training and across regimes: rank and β trajectories, loss curves, per-bucket loss beside capacity.

β over training (``beta_trajectories``): at every logged step that all runs of a series
share, the series' exponents are fitted as ``fits.fit_scaling`` fits the final aggregate,
with the per-layer values of that one step in place of the median of the last k (so each
run contributes its median over layers; seeds are replicate points; intervals as there).
Between two series (``pair_trajectories``), at every step both share: Δβ = β_a − β_b with
its own t-interval (one OLS with a series indicator and its interaction with log width),
and the level ratio, the geometric mean over shared widths of rank_a / rank_b (each the
median over seeds), with a t-interval across widths. ``separation`` says, per pair, at
which steps the two series' β intervals are disjoint.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from capscale.analysis.aggregate import REPORT_COLUMNS
from capscale.analysis.fits import FitOptions, fit_scaling
from capscale.spectrum import BUCKETS, SAMPLING_STATUSES

_STATUS_ORDER = {s: i for i, s in enumerate(SAMPLING_STATUSES)}

_RUN_COLS = ["run_id", "series", "width", "seed"]


def rank_trajectories(spectra: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run × step × site × bucket: soft and hard rank, median over layers, and per unit width."""
    grouped = spectra.groupby(["run_id", "step", "site", "bucket"], sort=True)
    out = grouped[["soft_rank", "hard_rank"]].median()
    out["dim"] = grouped["dim"].max()
    out["soft_frac"] = out["soft_rank"] / out["dim"]
    out["hard_frac"] = out["hard_rank"] / out["dim"]
    return out.reset_index().merge(runs[_RUN_COLS], on="run_id")


def loss_curves(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per run × logged step: training loss and, on evaluation steps, the validation losses."""
    cols = [
        c
        for c in ("step", "loss", "val_loss", "val_loss_head", "val_loss_mid", "val_loss_tail")
        if c in metrics.columns
    ]
    return metrics[["run_id", *cols]].merge(runs[_RUN_COLS], on="run_id").sort_values(["run_id", "step"])


def bucket_capacity(runs: pd.DataFrame, points: pd.DataFrame, site: str = "post") -> pd.DataFrame:
    """Per run × bucket (head/mid/tail): the final validation loss of the bucket beside its capacity.

    Capacity = the run's aggregated soft and hard rank of that bucket (and per unit width).
    """
    pts = points[(points["site"] == site) & points["bucket"].isin(BUCKETS)]
    loss = runs.melt(
        id_vars=_RUN_COLS + ["setting", "arch"],
        value_vars=[f"final_val_loss_{b}" for b in BUCKETS],
        var_name="bucket",
        value_name="val_loss",
    )
    loss["bucket"] = loss["bucket"].str.removeprefix("final_val_loss_")
    cols = ["run_id", "bucket", *REPORT_COLUMNS, "worst_status"]
    return loss.merge(pts[cols], on=["run_id", "bucket"], how="left").sort_values(
        ["series", "width", "seed", "bucket"], ignore_index=True
    )


# -- β over training ---------------------------------------------------------------------


def shared_steps(spectra: pd.DataFrame, runs: pd.DataFrame) -> dict[str, list[int]]:
    """Per series: the logged steps every one of its runs has (so every width enters each fit)."""
    steps = spectra.groupby("run_id")["step"].agg(lambda s: set(s.astype(int)))
    out = {}
    for series, group in runs.groupby("series", sort=True):
        have = [steps.get(r, set()) for r in group["run_id"]]
        out[series] = sorted(set.intersection(*have)) if have else []
    return out


def step_points(spectra: pd.DataFrame) -> pd.DataFrame:
    """Per run × step × site × bucket: soft and hard rank, median over layers, the worst sampling
    status and smallest N/D of the layers' records (``aggregate_runs`` for one step at a time)."""
    codes = spectra["sampling_status"].map(_STATUS_ORDER).fillna(-1)
    grouped = spectra.assign(_status=codes).groupby(["run_id", "step", "site", "bucket"], sort=True)
    out = grouped[["soft_rank", "hard_rank"]].median()
    out["dim"] = grouped["dim"].max()
    out["worst_status"] = grouped["_status"].max().map(lambda i: SAMPLING_STATUSES[int(i)] if i >= 0 else "unknown")
    out["min_samples_per_dim"] = grouped["samples_per_dim"].min()
    return out.reset_index()


def beta_trajectories(spectra: pd.DataFrame, runs: pd.DataFrame, options: FitOptions | None = None) -> pd.DataFrame:
    """β over training: one row per series × step × site × bucket × metric (soft_rank, hard_rank,
    delta_beta), with the columns of ``fit_scaling`` plus ``step`` and ``tokens`` (tokens seen
    before the measurement window opened; NaN where the runs do not say their tokens per step)."""
    options = options or FitOptions()
    sub = _shared_rows(spectra, runs)
    points = step_points(sub)
    layers = dict(list(sub.groupby("step", sort=True)))
    frames = [
        fit_scaling(at, layers[step], runs, options).assign(step=int(step))
        for step, at in points.groupby("step", sort=True)
    ]
    if not frames:
        return pd.DataFrame(columns=["series", "step", "tokens", "site", "bucket", "metric", "beta"])
    out = pd.concat(frames, ignore_index=True)
    out["tokens"] = out["step"] * out["series"].map(_tokens_per_step(runs))
    return out.sort_values(["series", "site", "bucket", "metric", "step"], ignore_index=True)


def _shared_rows(spectra: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The spectra rows of ``runs`` at the steps shared within each run's series."""
    keep = shared_steps(spectra, runs)
    wanted = pd.DataFrame(
        [(r, s) for series, g in runs.groupby("series") for r in g["run_id"] for s in keep[series]],
        columns=["run_id", "step"],
    )
    return spectra.merge(wanted.astype({"step": spectra["step"].dtype}), on=["run_id", "step"])


def _tokens_per_step(runs: pd.DataFrame) -> pd.Series:
    """Per series: tokens per optimizer step, when all its runs agree on it (else NaN)."""
    if "tokens_per_step" not in runs.columns:
        return pd.Series(math.nan, index=runs["series"].unique())
    per = runs.groupby("series")["tokens_per_step"].agg(lambda t: t.iloc[0] if t.nunique() == 1 else math.nan)
    return per.astype(float)


# -- between series ----------------------------------------------------------------------


def series_pairs(runs: pd.DataFrame, baseline: str = "adamw") -> list[tuple[str, str]]:
    """The pairs of series to compare: series of the same architecture and step budget that
    differ in optimizer label; where the baseline label is among them, each other series is
    paired with it (a, baseline), else every pair."""
    info = runs.drop_duplicates("series").set_index("series")
    pairs = []
    for _, group in info.groupby(["arch", "steps"], sort=True):
        labels = dict(zip(group["label"], group.index))
        if len(labels) < 2:
            continue
        if baseline in labels:
            pairs += [(labels[lab], labels[baseline]) for lab in sorted(labels) if lab != baseline]
        else:
            pairs += [(labels[a], labels[b]) for a, b in itertools.combinations(sorted(labels), 2)]
    return pairs


def pair_trajectories(
    spectra: pd.DataFrame,
    runs: pd.DataFrame,
    pairs: list[tuple[str, str]] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per pair (a, b) × shared step × site × bucket × metric (soft, hard): Δβ = β_a − β_b with
    a t-interval, and the level ratio (geometric mean over shared widths of median rank_a /
    median rank_b) with a t-interval across widths."""
    pairs = series_pairs(runs) if pairs is None else pairs
    keep = shared_steps(spectra, runs)
    tokens = _tokens_per_step(runs)
    points = step_points(_shared_rows(spectra, runs)).merge(runs[["run_id", "series", "width"]], on="run_id")
    rows = []
    for a, b in pairs:
        steps = sorted(set(keep.get(a, [])) & set(keep.get(b, [])))
        vals = points[points["series"].isin([a, b]) & points["step"].isin(steps)]
        for (step, site, bucket), g in vals.groupby(["step", "site", "bucket"], sort=True):
            for metric in ("soft", "hard"):
                col = f"{metric}_rank"
                ok = g[np.isfinite(g[col]) & (g[col] > 0)]
                ga, gb = ok[ok["series"] == a], ok[ok["series"] == b]
                row = {"series_a": a, "series_b": b, "step": int(step), "site": site, "bucket": bucket}
                row["tokens"] = step * tokens.get(a, math.nan) if tokens.get(a) == tokens.get(b) else math.nan
                row["metric"] = metric
                row["n_low_nd"] = int((ok["worst_status"] != "well_sampled").sum())
                row.update(_slope_difference(ga["width"], ga[col], gb["width"], gb[col], confidence))
                row.update(_level_ratio(ga, gb, col, confidence))
                rows.append(row)
    cols = ["series_a", "series_b", "step", "tokens", "site", "bucket", "metric", "dbeta", "dbeta_low", "dbeta_high"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)


def _slope_difference(wa, ra, wb, rb, confidence: float) -> dict:
    """β_a − β_b from one OLS, log R = c + β·log w + g·(c' + Δ·log w), g = 1 for series a.

    Both series keep their own intercept and slope, and share the residual variance, so
    Δ's t-interval has n − 4 degrees of freedom."""
    nan = {"dbeta": math.nan, "dbeta_low": math.nan, "dbeta_high": math.nan}
    if min(pd.Series(wa).nunique(), pd.Series(wb).nunique()) < 3:
        return nan
    x = np.log(np.concatenate([np.asarray(wa, float), np.asarray(wb, float)]))
    y = np.log(np.concatenate([np.asarray(ra, float), np.asarray(rb, float)]))
    g = np.concatenate([np.ones(len(wa)), np.zeros(len(wb))])
    design = np.column_stack([np.ones_like(x), x, g, g * x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(y) - 4
    if dof < 1:
        return {**nan, "dbeta": float(coef[3])}
    resid = y - design @ coef
    cov = (resid @ resid / dof) * np.linalg.inv(design.T @ design)
    half = stats.t.ppf(0.5 + confidence / 2, dof) * math.sqrt(max(cov[3, 3], 0.0))
    return {"dbeta": float(coef[3]), "dbeta_low": float(coef[3] - half), "dbeta_high": float(coef[3] + half)}


def _level_ratio(ga: pd.DataFrame, gb: pd.DataFrame, col: str, confidence: float) -> dict:
    """Geometric mean over shared widths of median(rank_a) / median(rank_b), t-interval across widths."""
    ma, mb = ga.groupby("width")[col].median(), gb.groupby("width")[col].median()
    widths = sorted(set(ma.index) & set(mb.index))
    logs = np.log(ma[widths].to_numpy(float) / mb[widths].to_numpy(float))
    out = {"ratio": math.nan, "ratio_low": math.nan, "ratio_high": math.nan, "ratio_widths": [int(w) for w in widths]}
    if len(logs) == 0:
        return out
    out["ratio"] = float(np.exp(logs.mean()))
    if len(logs) >= 2:
        half = stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
        out["ratio_low"], out["ratio_high"] = float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))
    return out


def separation(
    traj: pd.DataFrame,
    pairs: list[tuple[str, str]],
    *,
    site: str = "post",
    bucket: str = "all",
    metric: str = "hard_rank",
) -> pd.DataFrame:
    """Per pair: at which shared steps the two series' β (t-)intervals are disjoint.

    Steps where either fit is unfittable or uses a record with N/D below "well sampled"
    are left out (``n_skipped``). ``separated``: the steps with disjoint intervals;
    ``first``: the first of them; ``at_end``: whether the intervals are disjoint at the last
    step compared; ``higher``: the series with the larger β at that last step.
    """
    sel = traj[(traj["site"] == site) & (traj["bucket"] == bucket) & (traj["metric"] == metric)]
    rows = []
    for a, b in pairs:
        fa = sel[sel["series"] == a].set_index("step")
        fb = sel[sel["series"] == b].set_index("step")
        steps = sorted(set(fa.index) & set(fb.index))
        good = [
            s
            for s in steps
            if fa.at[s, "fittable"] and fb.at[s, "fittable"] and fa.at[s, "n_low_nd"] == 0 and fb.at[s, "n_low_nd"] == 0
        ]
        disjoint = [
            s for s in good if fa.at[s, "ci_low"] > fb.at[s, "ci_high"] or fb.at[s, "ci_low"] > fa.at[s, "ci_high"]
        ]
        last = good[-1] if good else None
        rows.append(
            {
                "series_a": a,
                "series_b": b,
                "site": site,
                "bucket": bucket,
                "metric": metric,
                "steps": good,
                "n_skipped": len(steps) - len(good),
                "separated": disjoint,
                "first": disjoint[0] if disjoint else None,
                "at_end": bool(last is not None and last in disjoint),
                "last": last,
                "beta_a_last": float(fa.at[last, "beta"]) if last is not None else math.nan,
                "beta_b_last": float(fb.at[last, "beta"]) if last is not None else math.nan,
                "higher": (a if fa.at[last, "beta"] > fb.at[last, "beta"] else b) if last is not None else None,
            }
        )
    return pd.DataFrame(rows)
