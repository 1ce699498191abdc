"""Print the tables of docs/beyond.md's plasticity subset section from the committed export.

    python scripts/plasticity_tables.py docs/results/cpu-long-plasticity

Reads ``report/report.json`` (``capscale report`` of the export: its ``plasticity`` key)
and the pretraining runs' ``spectra.parquet`` (the dormant fraction of their last window).
From report.json, rounded only: the relation (slope of each measure on log pretraining hard
rank at matched pretraining loss, within and across optimizers, seed-clustered intervals) and
every continued run's row. Derived here: the paired comparison Muon − AdamW over the pairs
that share FFN width and seed (mean difference, 95% t-interval over the pairs, and in how many
pairs Muon's value is the larger), the per-optimizer ranges, and the pretraining-end dormant
fractions (final logged step, all tokens, median over layers).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from capscale.rundir import read_spectra

SITE = "post"
OPTS = ("adamw", "muon")
PAIRED = {
    "pre_val_loss": "pretraining final validation loss",
    "val_loss_new_0": "new-domain loss at step 0",
    "auc_new": "`auc_new` (mean new-domain loss over K steps)",
    "adaptation": "adaptation (new-domain loss drop in K steps)",
    "forgetting": "forgetting (original-domain loss rise)",
}
MEASURES = {"auc_new": "`auc_new`", "adaptation": "adaptation", "forgetting": "forgetting"}


def num(v, nd: int = 3, sign: str = "") -> str:
    """Rounded, with the page's minus sign (−); ``sign="+"`` marks positives too."""
    return "—" if v is None or not math.isfinite(v) else f"{v:{sign}.{nd}f}".replace("-", "−")


def load(results: Path) -> dict:
    q = json.loads((results / "report" / "report.json").read_text())["plasticity"]
    if not q.get("shown"):
        raise SystemExit(f"{results}: report.json shows no plasticity section ({q.get('why')})")
    return q


def runs_frame(q: dict) -> pd.DataFrame:
    return pd.DataFrame(q["runs"]).astype({"ffn_width": int, "seed": int})


def pairs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (FFN width, seed) that both optimizers ran: each one's values side by side."""
    a, m = (runs[runs["label"] == o] for o in OPTS)
    return a.merge(m, on=["ffn_width", "seed"], suffixes=("_adamw", "_muon"), validate="one_to_one")


def paired_diff(p: pd.DataFrame, col: str, conf: float = 0.95) -> dict:
    d = (p[f"{col}_muon"] - p[f"{col}_adamw"]).to_numpy(float)
    n = len(d)
    half = stats.t.ppf(0.5 + conf / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return {"mean": d.mean(), "low": d.mean() - half, "high": d.mean() + half, "n": n, "n_pos": int((d > 0).sum())}


def span(v: pd.Series, nd: int = 3) -> str:
    return f"{num(v.min(), nd)}–{num(v.max(), nd)}"


def end_dormant(results: Path, names) -> pd.Series:
    """Each pretraining run's dormant fraction in its last logged window (all tokens, median over layers)."""
    out = {}
    for name in names:
        f = read_spectra(
            results / "runs" / name / "spectra.parquet", columns=["step", "site", "bucket", "dormant_frac"]
        )
        f = f[(f["site"] == SITE) & (f["bucket"] == "all")]
        out[name] = float(f[f["step"] == f["step"].max()]["dormant_frac"].median())
    return pd.Series(out)


def relation_table(q: dict) -> str:
    lines = [
        "| measure | within optimizers | across optimizers | runs | seeds (df) |",
        "|---|---|---|---|---|",
    ]
    rel = pd.DataFrame(q["relation"])
    for y, what in MEASURES.items():
        r = rel[rel["y"] == y].set_index("kind")
        cells = [
            f"{num(r.at[k, 'slope'])} [{num(r.at[k, 'ci_low'])}, {num(r.at[k, 'ci_high'])}]"
            for k in ("within", "across")
        ]
        n, g = int(r.at["within", "n"]), int(r.at["within", "n_seeds"])
        lines.append(f"| {what} | {cells[0]} | {cells[1]} | {n} | {g} ({g - 1}) |")
    return "\n".join(lines)


def paired_table(q: dict, runs: pd.DataFrame) -> str:
    p = pairs(runs)
    by = {o: runs[runs["label"] == o] for o in OPTS}
    n_runs = {o: len(by[o]) for o in OPTS}
    lines = [
        f"| | AdamW ({n_runs['adamw']} runs) | Muon ({n_runs['muon']} runs) | "
        f"Muon − AdamW, paired (95% t, {len(p)} pairs) | pairs Muon > AdamW |",
        "|---|---|---|---|---|",
    ]
    for col, what in PAIRED.items():
        d = paired_diff(p, col)
        lines.append(
            f"| {what} | {span(by['adamw'][col])} | {span(by['muon'][col])} | "
            f"{num(d['mean'], sign='+')} [{num(d['low'])}, {num(d['high'])}] | {d['n_pos']} of {d['n']} |"
        )
    ratio = p["pre_hard_rank_muon"] / p["pre_hard_rank_adamw"]
    lines.append(
        f"| {SITE}-activation hard rank, pretraining end | {span(by['adamw']['pre_hard_rank'], 1)} | "
        f"{span(by['muon']['pre_hard_rank'], 1)} | Muon / AdamW {span(ratio, 2)} | "
        f"{int((ratio > 1).sum())} of {len(ratio)} |"
    )
    d0, dk = f"{SITE}_dormant_frac_0", f"{SITE}_dormant_frac_k"
    lines.append(
        f"| {SITE} `dormant_frac` on the new domain, before → after | "
        f"{span(by['adamw'][d0])} → {span(by['adamw'][dk])} | {span(by['muon'][d0])} → {span(by['muon'][dk])} | | |"
    )
    return "\n".join(lines)


def dormant_table(results: Path, runs: pd.DataFrame) -> str:
    end = end_dormant(results, runs["pre_run_id"])
    runs = runs.assign(end_dormant=runs["pre_run_id"].map(end))
    lines = [
        "| optimizer | pretraining end: runs with dormant units | range | new domain: fell / rose / unchanged | after K steps, max |",
        "|---|---|---|---|---|",
    ]
    for o in OPTS:
        r = runs[runs["label"] == o]
        d = (r[f"{SITE}_dormant_frac_k"] - r[f"{SITE}_dormant_frac_0"]).to_numpy(float)
        lines.append(
            f"| {o} | {int((r['end_dormant'] > 0).sum())} of {len(r)} | {span(r['end_dormant'])} | "
            f"{int((d < 0).sum())} / {int((d > 0).sum())} / {int((d == 0).sum())} | "
            f"{num(r[f'{SITE}_dormant_frac_k'].max())} |"
        )
    return "\n".join(lines)


def facts(q: dict, runs: pd.DataFrame) -> str:
    """The numbers the prose quotes."""
    logr = np.log(runs["pre_hard_rank"].astype(float))
    within = runs.assign(lr=logr).groupby("label")["lr"].agg(lambda s: s.max() - s.min())
    p = pairs(runs)
    gap = float(np.log(p["pre_hard_rank_muon"] / p["pre_hard_rank_adamw"]).mean())
    w = next(r for r in q["relation"] if r["y"] == "auc_new" and r["kind"] == "within")
    return "\n".join(
        [
            f"- continued runs: {q['n_matched']} ({q['n_seeds']} seeds), K = {', '.join(map(str, q['steps']))}",
            f"- spread of auc_new over all runs: {num(runs['auc_new'].max() - runs['auc_new'].min())}",
            "- span of log pretraining hard rank within an optimizer: "
            + ", ".join(f"{o} {num(within[o], 2)}" for o in OPTS),
            f"- mean log(Muon / AdamW) pretraining hard rank over the pairs: {num(gap, 2)}; × the within slope of "
            f"auc_new and its interval: {num(gap * w['slope'])} [{num(gap * w['ci_low'])}, {num(gap * w['ci_high'])}]",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the export, e.g. docs/results/cpu-long-plasticity")
    args = parser.parse_args(argv)
    q = load(args.results)
    runs = runs_frame(q)
    print("## Relation\n\n" + relation_table(q) + "\n")
    print("## Paired\n\n" + paired_table(q, runs) + "\n")
    print("## Dormant\n\n" + dormant_table(args.results, runs) + "\n")
    print("## Facts\n\n" + facts(q, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
