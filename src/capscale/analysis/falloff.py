"""Effective-rank fall-off and dormant units over training (the plasticity literature's signs).

Per run × site × bucket, at each logged window: the soft and hard rank and ``dormant_frac``
(median over layers), and their change from the run's previous window: the ranks as a
log ratio ``log(R_t / R_{t−1})`` (negative = the effective rank fell), the dormant fraction
as a difference. ``falloff_summary`` keeps, per run × site × bucket, the largest fall-off
(the most negative log ratio) and the change over the whole run (last window vs first).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_KEYS = ["run_id", "site", "bucket"]


def rank_falloff(spectra: pd.DataFrame) -> pd.DataFrame:
    """One row per run × site × bucket × step: ``soft_rank``, ``hard_rank``, ``dormant_frac``
    (NaN where the spectra lack it) and ``d_log_soft``, ``d_log_hard``, ``d_dormant``: the
    change from the run's previous logged step (NaN at its first)."""
    df = spectra if "dormant_frac" in spectra.columns else spectra.assign(dormant_frac=np.nan)
    out = df.groupby([*_KEYS, "step"], sort=True)[["soft_rank", "hard_rank", "dormant_frac"]].median().reset_index()
    prev = out.groupby(_KEYS, sort=False)[["soft_rank", "hard_rank", "dormant_frac"]].shift(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["d_log_soft"] = np.log(out["soft_rank"] / prev["soft_rank"])
        out["d_log_hard"] = np.log(out["hard_rank"] / prev["hard_rank"])
    out["d_dormant"] = out["dormant_frac"] - prev["dormant_frac"]
    return out


def falloff_summary(falloff: pd.DataFrame) -> pd.DataFrame:
    """Per run × site × bucket: the largest fall-off of each rank (``max_falloff_soft``/``_hard``,
    the most negative step log ratio, as a positive number; 0 if the rank never fell), the step
    where the hard rank fell most, and the change over the run (``total_log_soft``/``_hard``,
    last vs first window; ``total_d_dormant``)."""
    rows = []
    for key, g in falloff.groupby(_KEYS, sort=True):
        g = g.sort_values("step")
        row = dict(zip(_KEYS, key))
        for rank, col in (("soft", "d_log_soft"), ("hard", "d_log_hard")):
            steps = g[col].dropna()
            row[f"max_falloff_{rank}"] = float(max(0.0, -steps.min())) if len(steps) else np.nan
        hard = g["d_log_hard"]
        row["step_max_falloff_hard"] = int(g.loc[hard.idxmin(), "step"]) if hard.notna().any() else -1
        first, last = g.iloc[0], g.iloc[-1]
        row["total_log_soft"] = float(np.log(last["soft_rank"] / first["soft_rank"]))
        row["total_log_hard"] = float(np.log(last["hard_rank"] / first["hard_rank"]))
        row["total_d_dormant"] = float(last["dormant_frac"] - first["dormant_frac"])
        rows.append(row)
    return pd.DataFrame(rows)
