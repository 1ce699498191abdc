"""Optimizer × architecture: is the optimizer's effect on β larger than the architecture's?

For each metric (β_soft, β_hard; headline site, bucket ``all``) two kinds of spans:

- **optimizer effect** within one architecture: max β − min β across the optimizer
  settings trained on it (needs ≥ 2 settings);
- **architecture effect** within one optimizer setting: max β − min β across the
  architectures it was trained on (needs ≥ 2; only when an architecture axis varies).

The paper's claim "optimizer-induced spectral shifts often exceed the architectural
effects" is then a comparison of the median spans.

A span compares β fitted over the **same widths**: rank is rarely an exact power law, so
β over ×1…×16 and β over ×1…×4 differ even for one model family, and a span between
them would mix that curvature into the effect. Each comparison refits its series on
the widths all of them share (``widths`` in the row); when fewer than 3 are shared,
the series with the fewest widths is left out until 3 are (``n_compared`` counts the
series kept). The cells keep each series' fit over all its widths.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from capscale.spectrum import fit_power_law

MIN_WIDTHS = 3
_METRIC = {"soft": "soft_rank", "hard": "hard_rank"}
EFFECT_COLUMNS = [
    "kind",
    "within",
    "metric",
    "span",
    "n_compared",
    "highest",
    "lowest",
    "beta_highest",
    "beta_lowest",
    "widths",
]


def shared_widths(widths: dict[str, set[int]], min_widths: int = MIN_WIDTHS) -> tuple[list[str], list[int]]:
    """The series to compare and the widths they all have: drop the series with the fewest
    widths (ties: the last by name) until ``min_widths`` are shared; ([], []) if two cannot be."""
    keep = sorted(widths, key=lambda s: (-len(widths[s]), s))
    while len(keep) >= 2:
        common = set.intersection(*(widths[s] for s in keep))
        if len(common) >= min_widths:
            return sorted(keep), sorted(common)
        keep.pop()
    return [], []


def optimizer_architecture(
    betas: pd.DataFrame, points: pd.DataFrame, runs: pd.DataFrame, site: str = "post", bucket: str = "all"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, effects). ``betas``: ``fits.beta_table`` output; ``points``: the per-run aggregates
    (``aggregate.aggregate_runs``); ``runs``: the sweep's runs table.

    cells: one row per setting × arch with β_soft, β_hard, Δβ and intervals (all widths).
    effects: one row per (kind, within, metric): the span of β refitted on shared widths,
    which series are highest and lowest and their β there, and the widths used.
    """
    sel = betas[(betas["site"] == site) & (betas["bucket"] == bucket)]
    cols = ["setting", "arch", "series"] + [
        f"{m}_{f}" for m in ("soft", "hard", "delta") for f in ("beta", "ci_low", "ci_high", "fittable")
    ]
    cells = sel[cols].sort_values(["setting", "arch"], ignore_index=True)
    pts = points[(points["site"] == site) & (points["bucket"] == bucket)].merge(
        runs[["run_id", "width", "setting", "arch"]], on="run_id"
    )
    rows = []
    for kind, group_col, across_col in (("optimizer", "arch", "setting"), ("architecture", "setting", "arch")):
        for within, group in pts.groupby(group_col, sort=True):
            for metric, column in _METRIC.items():
                ok = group[np.isfinite(group[column]) & (group[column] > 0)]
                widths = {k: set(g["width"]) for k, g in ok.groupby(across_col)}
                keep, common = shared_widths(widths)
                if not keep:
                    continue
                beta = {}
                for k in keep:
                    g = ok[(ok[across_col] == k) & ok["width"].isin(common)]
                    beta[k] = fit_power_law(g["width"], g[column]).beta
                hi, lo = max(beta, key=beta.get), min(beta, key=beta.get)
                rows.append(
                    {
                        "kind": kind,
                        "within": within,
                        "metric": metric,
                        "span": beta[hi] - beta[lo],
                        "n_compared": len(keep),
                        "highest": hi,
                        "lowest": lo,
                        "beta_highest": beta[hi],
                        "beta_lowest": beta[lo],
                        "widths": [int(w) for w in common],
                    }
                )
    return cells, pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def effect_summary(effects: pd.DataFrame) -> pd.DataFrame:
    """Per metric: the median optimizer span, the median architecture span, and which is larger."""
    rows = []
    for metric in ("soft", "hard"):
        sub = effects[effects["metric"] == metric]
        opt = sub[sub["kind"] == "optimizer"]["span"].median()
        arch = sub[sub["kind"] == "architecture"]["span"].median()
        if pd.isna(opt) or pd.isna(arch):
            larger = None
        else:
            larger = "optimizer" if opt > arch else "architecture"
        rows.append({"metric": metric, "optimizer_span": opt, "architecture_span": arch, "larger": larger})
    return pd.DataFrame(rows)
