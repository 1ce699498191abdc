"""Print the secondary measures of the `cpu-depth` study (docs/replication.md) from its report.

    python scripts/cpu_depth_tables.py docs/results/cpu-depth

Reads ``report/report.json`` (``capscale report`` of the export). The pre-registered verdict
(D, I, the repetition contrast and the rule) is ``scripts/cpu_depth_verdict.py``'s; this prints
what docs/preregistration/cpu-depth.md lists as secondary (95% intervals, unadjusted unless a
Holm p is shown; no verdict rests on them):

- per layer (post-activation, all tokens): β_hard and β_soft per optimizer (mean over seeds of
  per-seed β, t-interval over seeds) and Δβ = Muon − AdamW (Welch over seeds), at depth 2
  (layers 0–1) and depth 6 (layers 0–5): ``per_layer.betas`` and ``per_layer.contrasts``;
- the depth × optimizer interaction per matched layer, first with first and last with last:
  Δβ(depth 6, layer) − Δβ(depth 2, layer), derived here with
  ``capscale.analysis.perlayer.interaction`` (Welch–Satterthwaite), and the product's own,
  on the median over layers (``per_layer.interaction``);
- Δβ per depth on the median over layers, pre- and post-activation, every bucket:
  ``design.contrasts`` (Holm over the cells of one site × bucket × metric);
- the level: Muon's hard rank over AdamW's per depth (geometric mean over widths): ``levels``;
- lack of fit of each power law (pure-error F-test, seeds as replicates): ``per_layer.lack_of_fit``;
- the minimum detectable Δβ at 80% power per depth: ``per_layer.mde``;
- Δβ over training: ``beta_trajectory.separation``, verbatim.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pandas as pd

from capscale.analysis.perlayer import interaction

OPTS = ("adamw", "muon")  # the contrast is Muon − AdamW
METRICS = {"hard_rank": "β_hard", "soft_rank": "β_soft"}


def depth(cell: str) -> int:
    """'n_layer=6' (or a series name holding it) → 6."""
    return int(re.search(r"n_layer=(\d+)", cell).group(1))


def ci(v, lo, hi, nd: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.{nd}f}"
    return f"{v:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def per_layer(report: dict, site: str = "post", bucket: str = "all") -> str:
    betas = pd.DataFrame(report["per_layer"]["betas"])
    diffs = pd.DataFrame(report["per_layer"]["contrasts"])
    betas = betas[(betas.site == site) & (betas.bucket == bucket)]
    diffs = diffs[(diffs.site == site) & (diffs.bucket == bucket)]
    rows = []
    for cell in sorted(set(betas.cell), key=depth):
        for layer in sorted(set(betas[betas.cell == cell].layer)):
            row = [str(depth(cell)), str(layer)]
            for metric in METRICS:
                at = betas[(betas.cell == cell) & (betas.layer == layer) & (betas.metric == metric)]
                for opt in OPTS:
                    b = at[at.treatment == opt]
                    row.append(ci(*b[["beta", "low", "high"]].iloc[0]) if len(b) else "—")
                d = diffs[(diffs.cell == cell) & (diffs.layer == layer) & (diffs.metric == metric)]
                row.append(ci(*d[["diff", "low", "high"]].iloc[0]) if len(d) else "—")
            rows.append(row)
    head = ["depth", "layer"] + [f"{m} {o}" for m in METRICS.values() for o in (*OPTS, "Δ (muon − adamw)")]
    return table(head, rows)


def matched_layers(report: dict, site: str = "post", bucket: str = "all") -> pd.DataFrame:
    """Δβ(depth 6) − Δβ(depth 2) for the first layers and for the last layers of the two depths."""
    diffs = pd.DataFrame(report["per_layer"]["contrasts"])
    diffs = diffs[(diffs.site == site) & (diffs.bucket == bucket) & diffs.metric.isin(list(METRICS))].copy()
    last = diffs.groupby("cell").layer.transform("max")
    diffs["layer"] = ["first" if k == 0 else "last" if k == m else None for k, m in zip(diffs.layer, last)]
    diffs = diffs.dropna(subset=["layer"])
    cells = pd.DataFrame(report["design"]["cells"]).drop(columns=["treatments", "widths"], errors="ignore")
    cells = cells[["cell", "n_layer"]]
    cols = ["site", "bucket", "metric", "layer", "cell", "a", "b", "diff", "se", "df"]
    return interaction(diffs[cols], cells, factor="n_layer")


def interactions(report: dict) -> str:
    rows = []
    for r in matched_layers(report).itertuples():
        rows.append([f"{r.layer} layer", METRICS[r.metric], f"{r.delta_shallow:.2f}", f"{r.delta_deep:.2f}"])
        rows[-1].append(ci(r.diff, r.low, r.high))
    for r in report["per_layer"]["interaction"]:
        if r["site"] == "post" and r["bucket"] == "all" and r["metric"] in METRICS:
            rows.append(["median over layers (the product's)", METRICS[r["metric"]]])
            rows[-1] += [f"{r['delta_shallow']:.2f}", f"{r['delta_deep']:.2f}", ci(r["diff"], r["low"], r["high"])]
    return table(["layers", "metric", "Δβ depth 2", "Δβ depth 6", "interaction [95% CI]"], rows)


def by_depth(report: dict) -> str:
    rows = []
    for c in report["design"]["contrasts"]:
        if c["metric"] not in METRICS:
            continue
        holm = "—" if c.get("holm_p") is None else f"{c['holm_p']:.3f}"
        rows.append(
            [c["site"], c["bucket"], METRICS[c["metric"]], str(depth(c["cell"])), ci(c["diff"], c["low"], c["high"])]
        )
        rows[-1] += [holm, ci(c.get("mde"), None, None), ci(c.get("mde_holm"), None, None)]
    rows.sort(key=lambda r: (r[0] != "post", ("all", "head", "mid", "tail").index(r[1]), r[2], int(r[3])))
    return table(["site", "bucket", "metric", "depth", "Δβ muon − adamw", "Holm p", "MDE", "MDE at α/m"], rows)


def levels(report: dict) -> str:
    rows = []
    for r in report["levels"]:
        if r["metric"] == "hard_rank" and r["bucket"] == "all":
            holm = "—" if r.get("holm_p") is None else f"{r['holm_p']:.3f}"
            rows.append([str(depth(r["cell"])), ci(r["ratio"], r["ratio_low"], r["ratio_high"]), holm])
    return table(["depth", "hard rank, muon ÷ adamw (geometric mean over widths)", "Holm p"], sorted(rows))


def lack_of_fit(report: dict) -> str:
    rows = []
    for r in report["per_layer"]["lack_of_fit"]:
        if r["site"] == "post" and r["bucket"] == "all" and r["metric"] in METRICS:
            p = "—" if r.get("p") is None or not math.isfinite(r["p"]) else f"{r['p']:.3f}"
            rows.append([r["series"], METRICS[r["metric"]], ci(r.get("f"), None, None), p, r.get("note") or ""])
    return table(["series", "metric", "F", "p", "note"], sorted(rows))


def mde(report: dict) -> str:
    rows = [
        [str(depth(r["cell"])), r["metric"], ci(r["mde"], None, None), str(r["n_a"]), str(r["n_b"])]
        for r in report["per_layer"]["mde"]
    ]
    return table(["depth", "metric", "MDE at 80% power", "seeds adamw", "seeds muon"], sorted(rows))


def trajectory(report: dict) -> str:
    return "\n".join(f"- {s['sentence']}" for s in report["beta_trajectory"]["separation"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="the export (its report/report.json)")
    args = ap.parse_args(argv)
    report = json.loads((args.root / "report" / "report.json").read_text())
    for title, body in (
        ("Per layer, post-activation, all tokens (intervals over seeds)", per_layer(report)),
        ("Depth × optimizer interaction per matched layer (secondary)", interactions(report)),
        ("Δβ per depth, median over layers", by_depth(report)),
        ("Level", levels(report)),
        ("Lack of fit of each power law (post, all tokens)", lack_of_fit(report)),
        ("Minimum detectable Δβ per depth", mde(report)),
        ("Δβ over training", trajectory(report)),
    ):
        print(f"### {title}\n\n{body}\n")


if __name__ == "__main__":
    main()
