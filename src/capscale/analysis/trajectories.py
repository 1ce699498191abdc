"""Over training and across regimes: rank trajectories, loss curves, per-bucket loss beside capacity."""

from __future__ import annotations

import pandas as pd

from capscale.analysis.aggregate import REPORT_COLUMNS
from capscale.spectrum import BUCKETS

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
