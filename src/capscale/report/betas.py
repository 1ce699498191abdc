"""The β rows of ``report.json``: one per series × site × token bucket, with β_soft, β_hard and Δβ.

``betas`` holds every row; Q1 and Q3 show the headline site's all-token rows, Q4 the headline
site's rows of every bucket. Each comes from ``beta_rows``, so every part says the same.
"""

from __future__ import annotations

import pandas as pd

from capscale.analysis import Analysis
from capscale.analysis.fits import BETA_FIELDS
from capscale.report.records import jsonable


def _beta_row(r: pd.Series, seeds: dict) -> dict:
    """One series × site × bucket: β_soft, β_hard and Δβ, each with its intervals."""
    out = {k: r[k] for k in ("series", "setting", "label", "steps", "arch", "site", "bucket", "n_widths")}
    for kind in ("soft", "hard", "delta"):
        b = {f: r[f"{kind}_{f}"] for f in BETA_FIELDS}
        if b["boot_over"] == "layers":  # the spread over layers is not uncertainty over seeds: not shown as one
            b.update(boot_low=None, boot_high=None, boot_over=None)
        b["interval_over"] = (
            "seeds" if seeds.get(r["series"], 0) >= 2 else "widths only (one seed: no interval over seeds)"
        )
        out[f"beta_{kind}"] = b
    return out


def beta_rows(a: Analysis, site: str | None = None, bucket: str | None = None) -> list[dict]:
    """The β rows (JSON-ready), sorted by series, site and bucket; ``site``/``bucket``: only those."""
    seeds = a.sweep.runs.groupby(["series", "width"])["seed"].nunique().groupby("series").min().to_dict()
    rows = [_beta_row(r, seeds) for _, r in a.betas.sort_values(["series", "site", "bucket"]).iterrows()]
    rows = [b for b in rows if (site is None or b["site"] == site) and (bucket is None or b["bucket"] == bucket)]
    return jsonable(rows)
