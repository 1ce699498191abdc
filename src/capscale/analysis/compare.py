"""Optimizer × architecture: is the optimizer's effect on β larger than the architecture's?

For each metric (β_soft, β_hard; headline site, bucket ``all``) two kinds of spans:

- **optimizer effect** within one architecture: max β − min β across the optimizer
  settings trained on it (needs ≥ 2 settings);
- **architecture effect** within one optimizer setting: max β − min β across the
  architectures it was trained on (needs ≥ 2; only when an architecture axis varies).

The paper's claim "optimizer-induced spectral shifts often exceed the architectural
effects" is then a comparison of the median spans.
"""

from __future__ import annotations

import pandas as pd


def optimizer_architecture(betas: pd.DataFrame, site: str = "post",
                           bucket: str = "all") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, effects). ``betas``: ``fits.beta_table`` output.

    cells: one row per setting × arch with β_soft, β_hard, Δβ and intervals.
    effects: one row per (kind, within, metric) with the span and what it spans.
    """
    sel = betas[(betas["site"] == site) & (betas["bucket"] == bucket)]
    cols = ["setting", "arch", "series"] + [f"{m}_{f}" for m in ("soft", "hard", "delta")
                                             for f in ("beta", "ci_low", "ci_high", "fittable")]
    cells = sel[cols].sort_values(["setting", "arch"], ignore_index=True)
    rows = []
    for kind, group_col, across_col in (("optimizer", "arch", "setting"), ("architecture", "setting", "arch")):
        for within, group in cells.groupby(group_col, sort=True):
            for metric in ("soft", "hard"):
                ok = group[group[f"{metric}_fittable"].astype(bool)]
                if ok[across_col].nunique() < 2:
                    continue
                hi, lo = ok.loc[ok[f"{metric}_beta"].idxmax()], ok.loc[ok[f"{metric}_beta"].idxmin()]
                rows.append({"kind": kind, "within": within, "metric": metric,
                             "span": hi[f"{metric}_beta"] - lo[f"{metric}_beta"], "n_compared": len(ok),
                             "highest": hi[across_col], "lowest": lo[across_col]})
    effects = pd.DataFrame(rows, columns=["kind", "within", "metric", "span", "n_compared", "highest", "lowest"])
    return cells, effects


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
