"""Does realized capacity at the end of pretraining predict plasticity? (the blog's open question 2)

Reads the ``plasticity.json`` of continued runs (``capscale.train.plasticity``) and joins
each to its pretraining run's aggregated capacity (``last_k_per_layer`` → ``aggregate_runs``
of the run it continued; the run table's label, seed and final validation loss). The
relation is an OLS of an adaptation measure (default ``auc_new``: the mean new-domain loss
over the K steps, lower = faster) on log rank, **at matched loss** (the pretraining run's
final validation loss is a covariate), with seed-clustered intervals (``law.ols_clustered``:
the larger of the cluster-robust and classical standard error, t with G − 1 df):

- ``within``: with one intercept per optimizer label: does the rank predict adaptation
  among runs of the same optimizer (width and seed vary)?
- ``across``: no label term: the optimizers' different capacities enter too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from capscale.analysis.aggregate import aggregate_runs, last_k_per_layer
from capscale.analysis.law import _se, _t, ols_clustered
from capscale.analysis.runs import load_sweep

SUMMARY_FILE = "plasticity.json"  # written by capscale.train.plasticity (not imported: analysis reads files)


def load_plasticity(root: str | Path) -> pd.DataFrame:
    """One row per continued run below ``root`` (every ``plasticity.json`` at any depth)."""
    rows = [_read(p) for p in sorted(Path(root).rglob(SUMMARY_FILE))]
    if not rows:
        raise FileNotFoundError(f"no {SUMMARY_FILE} below {root}: run `capscale plasticity` first")
    return pd.DataFrame(rows)


def _read(path: Path) -> dict:
    """One result, with the corpus it continued on (from its run's config.json, where readable)."""
    row = json.loads(path.read_text()) | {"path": str(path.parent)}
    try:
        cont = json.loads((path.parent / "config.json").read_text()).get("plasticity") or {}
    except (OSError, ValueError, AttributeError):
        cont = {}
    row.setdefault("data_description", cont.get("data_description") or cont.get("data"))
    return row


def find_plasticity(root: str | Path) -> pd.DataFrame:
    """Like ``load_plasticity``, but an empty frame where ``root`` holds no results (a report's
    question: is there anything to show?)."""
    try:
        return load_plasticity(root)
    except FileNotFoundError:
        return pd.DataFrame()


def join_capacity(results: pd.DataFrame, points: pd.DataFrame, runs: pd.DataFrame, site: str = "post") -> pd.DataFrame:
    """``results`` joined to their pretraining runs by the run directory's name: ``points``
    (``aggregate_runs``' frame) gives ``pre_soft_rank``, ``pre_hard_rank`` (all tokens,
    ``site``) and ``runs`` (a sweep's run table, with ``path``) ``pre_val_loss``. A result
    whose run is not among ``runs`` (or whose name two runs share) gets NaN there."""
    pts = points[(points["site"] == site) & (points["bucket"] == "all")].set_index("run_id")
    names = runs["path"].map(lambda p: Path(p).name)
    unique = runs[~names.duplicated(keep=False)].assign(_name=names).set_index("_name")
    out = results.copy()
    run_id = out["from_run"].map(lambda p: Path(p).name).map(unique["run_id"])
    out["pre_run_id"] = run_id
    out["pre_soft_rank"] = run_id.map(pts["soft_rank"])
    out["pre_hard_rank"] = run_id.map(pts["hard_rank"])
    out["pre_val_loss"] = run_id.map(unique.set_index("run_id")["final_val_loss"])
    return out


def plasticity_table(results: pd.DataFrame, last_k: int = 5, site: str = "post") -> pd.DataFrame:
    """``results`` joined to each pretraining run's aggregated soft/hard rank (all tokens, ``site``)
    and final validation loss (``pre_soft_rank``, ``pre_hard_rank``, ``pre_val_loss``), the runs
    read from the paths the results name."""
    sweep = load_sweep(list(dict.fromkeys(results["from_run"])))
    points = aggregate_runs(last_k_per_layer(sweep.spectra, last_k))
    return join_capacity(results, points, sweep.runs, site)


def plasticity_relation(
    table: pd.DataFrame,
    x: str = "pre_hard_rank",
    y: str = "auc_new",
    control: str | None = "pre_val_loss",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Slope of ``y`` on log ``x`` (at matched ``control``), ``within`` and ``across`` optimizer
    labels: ``slope``, ``ci_low``, ``ci_high``, ``n``, ``n_seeds`` and a ``note`` where the design
    cannot say (too few runs, or the rank does not vary once the label is fixed)."""
    data = table[np.isfinite(table[x]) & (table[x] > 0) & np.isfinite(table[y])]
    if control is not None:
        data = data[np.isfinite(data[control])]
    rows = []
    for kind in ("within", "across"):
        cols = [np.log(data[x].to_numpy(float))]
        if control is not None:
            cols.append(data[control].to_numpy(float))
        if kind == "within":
            labels = sorted(data["label"].unique())
            cols += [(data["label"] == lab).to_numpy(float) for lab in labels]
        else:
            cols.append(np.ones(len(data)))
        X = np.column_stack(cols) if len(data) else np.zeros((0, len(cols)))
        row = {"kind": kind, "x": x, "y": y, "control": control, "n": len(data), "n_seeds": data["seed"].nunique()}
        try:
            beta, covs, df, _, _ = ols_clustered(X, data[y].to_numpy(float), data["seed"].to_numpy())
            half = _t(confidence, df) * _se(covs, np.eye(len(beta))[0])
            row.update(slope=float(beta[0]), ci_low=float(beta[0] - half), ci_high=float(beta[0] + half), note="")
        except ValueError as exc:
            row.update(slope=math.nan, ci_low=math.nan, ci_high=math.nan, note=str(exc))
        rows.append(row)
    return pd.DataFrame(rows)
