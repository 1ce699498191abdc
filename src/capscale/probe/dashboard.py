"""What a measurement shows on a dashboard (TensorBoard, W&B, a Lightning logger).

Tags are grouped metric first, so a person finds them by name:

- ``capscale/{metric}/median/{site}``: the headline, the median over layers (as the report);
- ``capscale/{metric}/{head|mid|tail}/{site}``: the same median per token-frequency bucket;
- ``capscale/{metric}/layer{LL}/{site}``: every layer;
- ``capscale/undersampled_layers/{site}``: layers whose N/D is below 10 (not ``well_sampled``);
- histograms ``capscale/eigenvalues/layer{LL}/{site}``: log10 of the eigenvalues.

``metric`` is ``soft_rank``, ``hard_rank``, ``soft_rank_per_width`` and
``hard_rank_per_width`` (rank / D), ``samples_per_dim`` (N/D) and ``dormant_frac`` (the
share of units whose variance is below ``DORMANT_REL_VARIANCE`` of the mean; absent from
rows written before the column existed). Per-layer and histogram values are of the ``all`` bucket.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# dashboard name → spectra column
METRICS = {
    "soft_rank": "soft_rank",
    "hard_rank": "hard_rank",
    "soft_rank_per_width": "soft_rank_frac_dim",
    "hard_rank_per_width": "hard_rank_frac_dim",
    "samples_per_dim": "samples_per_dim",
    "dormant_frac": "dormant_frac",
}


def dashboard_scalars(frame: pd.DataFrame, prefix: str = "capscale") -> dict[str, float]:
    """The scalars of one measurement (spectra rows of one step); NaN values are left out."""
    out: dict[str, float] = {}
    for (bucket, site), grp in frame.groupby(["bucket", "site"], sort=True):
        where = "median" if bucket == "all" else bucket
        for name, col in METRICS.items():
            if col not in grp:
                continue
            v = grp[col].astype(float).dropna()
            if len(v):
                out[f"{prefix}/{name}/{where}/{site}"] = float(np.median(v))
        if bucket != "all":
            continue
        out[f"{prefix}/undersampled_layers/{site}"] = float((grp["sampling_status"] != "well_sampled").sum())
        for _, row in grp.sort_values("layer").iterrows():
            for name, col in METRICS.items():
                v = float(row.get(col, math.nan))
                if math.isfinite(v):
                    out[f"{prefix}/{name}/layer{int(row['layer']):02d}/{site}"] = v
    return out


def eigenvalue_histograms(frame: pd.DataFrame, prefix: str = "capscale") -> dict[str, np.ndarray]:
    """log10 eigenvalues per (layer, site) of the ``all`` bucket: one histogram each."""
    out = {}
    rows = frame[frame["bucket"] == "all"].sort_values(["layer", "site"])
    for _, row in rows.iterrows():
        eigs = row["eigenvalues"]
        if eigs is None or (isinstance(eigs, float) and math.isnan(eigs)) or len(eigs) == 0:
            continue
        out[f"{prefix}/eigenvalues/layer{int(row['layer']):02d}/{row['site']}"] = np.log10(np.asarray(eigs, float))
    return out


def frame_step(frame: pd.DataFrame) -> int:
    """The measured step of a window's rows (a window has one)."""
    return int(frame["step"].iloc[0])


def is_monitor_key(key: str) -> bool:
    # Full measurements reach dashboards through their spectra; only the monitoring
    # level (no spectra) arrives as bare scalars.
    return key.startswith("capscale/monitor/")
