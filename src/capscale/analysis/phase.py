"""Phase map: each run at (R1/D, R2/D), its final aggregated post-activation ranks (bucket ``all``).

The paper draws this map but gives no region boundaries; ours are parameters
(``PhaseThresholds``), stated in every report. With r1 = R1/D (soft rank per unit
width), r2 = R2/D (hard rank per unit width) and the balance r2/r1 = R2/R1
(= exp(−asymmetry)), checked in this order:

- **impossible**: r2 > r1 (beyond round-off, ``impossible_tol``). R2 ≤ R1 holds for
  every spectrum, so a run here signals a measurement or aggregation error.
- **collapsed**: r1 < ``collapsed_soft`` (default 0.05): even the soft rank uses
  under 5% of the width; added width is not becoming capacity.
- **brittle**: r2/r1 < ``brittle_ratio`` (default 0.25, i.e. asymmetry
  log(R1/R2) > log 4 ≈ 1.39): many directions carry *some* variance, but the
  energy sits in a few — a broad soft rank resting on a narrow hard rank.
- **broad**: r1 ≥ ``broad_soft`` (default 0.5) with a balanced spectrum: at least
  half the width in use, and the energy spread over it.
- **compact**: the rest: balanced, but using only part of the width
  (``collapsed_soft`` ≤ r1 < ``broad_soft``).

On log axes the boundaries are two vertical lines (r1 = collapsed_soft, r1 =
broad_soft) and the diagonal r2 = brittle_ratio · r1, parallel to the impossible
boundary r2 = r1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd

REGIONS = ("collapsed", "compact", "broad", "brittle", "impossible")


@dataclass(frozen=True)
class PhaseThresholds:
    collapsed_soft: float = 0.05
    broad_soft: float = 0.5
    brittle_ratio: float = 0.25
    impossible_tol: float = 1e-9

    def __post_init__(self) -> None:
        if not 0 < self.collapsed_soft < self.broad_soft <= 1:
            raise ValueError(
                "phase thresholds need 0 < collapsed_soft < broad_soft <= 1, got "
                f"collapsed_soft={self.collapsed_soft}, broad_soft={self.broad_soft}"
            )
        if not 0 < self.brittle_ratio < 1:
            raise ValueError(f"phase threshold brittle_ratio must be in (0, 1), got {self.brittle_ratio}")
        if not self.impossible_tol >= 0:
            raise ValueError(f"phase threshold impossible_tol must be >= 0, got {self.impossible_tol}")

    def to_dict(self) -> dict:
        return asdict(self)


def classify(soft_frac: float, hard_frac: float, thresholds: PhaseThresholds = PhaseThresholds()) -> str:
    """The region of one point (R1/D, R2/D); ``"unknown"`` when a rank is missing."""
    t = thresholds
    if not (math.isfinite(soft_frac) and math.isfinite(hard_frac)) or soft_frac <= 0:
        return "unknown"
    if hard_frac > soft_frac * (1 + t.impossible_tol):
        return "impossible"
    if soft_frac < t.collapsed_soft:
        return "collapsed"
    if hard_frac / soft_frac < t.brittle_ratio:
        return "brittle"
    if soft_frac >= t.broad_soft:
        return "broad"
    return "compact"


def phase_map(
    points: pd.DataFrame,
    runs: pd.DataFrame,
    thresholds: PhaseThresholds = PhaseThresholds(),
    site: str = "post",
    bucket: str = "all",
) -> pd.DataFrame:
    """One row per run: its (R1/D, R2/D), balance R2/R1 and region."""
    sel = points[(points["site"] == site) & (points["bucket"] == bucket)]
    cols = ["run_id", "name", "series", "setting", "arch", "label", "width", "seed"]
    out = runs[cols].merge(sel[["run_id", "soft_frac", "hard_frac", "worst_status"]], on="run_id", how="left")
    out["balance"] = out["hard_frac"] / out["soft_frac"]
    out["region"] = [classify(r1, r2, thresholds) for r1, r2 in zip(out["soft_frac"], out["hard_frac"])]
    return out
