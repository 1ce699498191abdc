"""Print the tables of docs/replication.md from the committed results.

    python scripts/replication_tables.py docs/results

Every number in the page's tables comes from here, read from ``report.json`` (the
sweep's report), ``posthoc_ranks.csv`` / ``posthoc_betas.csv`` (the well-sampled
check) and the paper's published β table. Nothing is computed that the report has
not: medians, intervals and losses are printed as stored, only rounded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

PAPER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "paper_reference" / "beta_table.csv"
NAMES = {
    "adamw": "AdamW",
    "muon": "Muon",
    "normuon": "NorMuon",
    "dion_r1_2": "Dion (1/2)",
    "dion_r1_16": "Dion (1/16)",
    "shampoo": "Shampoo",
}


def label(series: str) -> str:
    """'adamw · 1200 steps · pos=rope' → 'AdamW, 1200 steps'; the preset's main arm → 'AdamW'."""
    parts = [p.strip() for p in series.split("·")]
    out = [NAMES.get(parts[0], parts[0])]
    out += [p for p in parts[1:] if p not in ("pos=rope", "600 steps")]
    return ", ".join(o.replace("pos=none", "no position") for o in out)


def sort_key(name: str) -> tuple:
    """The preset's main arms first, in optimizer order, then the extra arms."""
    lab = label(name)
    head = lab.split(",")[0]
    order = list(NAMES.values())
    return ("," in lab, order.index(head) if head in order else len(order), lab)


def ci(fit: dict | None, nd: int = 2) -> str:
    if not fit or not fit.get("fittable") or fit.get("beta") is None:
        return "not fittable"
    return f"{fit['beta']:.{nd}f} [{fit['ci_low']:.{nd}f}, {fit['ci_high']:.{nd}f}]"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(report: dict) -> str:
    rows = sorted(report["runs"], key=lambda r: (sort_key(r["series"]), r["width"], r["seed"]))
    return table(
        ["run", "arm", "FFN width", "seed", "steps", "final val loss (nats)"],
        [
            [r["name"], label(r["series"]), r["width"], r["seed"], r["steps"], f"{r['final_val_loss']:.3f}"]
            for r in rows
        ],
    )


def coverage_table(report: dict) -> str:
    """Arm × width: how many seeds finished."""
    runs = pd.DataFrame(report["runs"])
    widths = sorted(runs.width.unique())
    n = runs.groupby(["series", "width"]).seed.nunique()
    return table(
        ["arm", *map(str, widths)],
        [[label(s), *(str(n.get((s, w), "—")) for w in widths)] for s in sorted(runs.series.unique(), key=sort_key)],
    )


def ranks_table(report: dict) -> str:
    pts = pd.DataFrame(report["q1_scaling"]["points"])
    pts = pts[(pts.site == "post") & (pts.bucket == "all")]
    stats = pts.pivot_table(index=["series", "width"], columns="metric", values=["median", "min", "max"])
    seeds = pts.groupby(["series", "width"]).n_seeds.max()
    loss = pd.DataFrame(report["q2_matched_loss"]["loss_by_width"]).set_index(["series", "width"])

    def spread(med: float, lo: float, hi: float, nd: int, many: bool) -> str:
        return f"{med:.{nd}f}" + (f" ({lo:.{nd}f}–{hi:.{nd}f})" if many else "")

    rows = []
    for (series, width), r in sorted(stats.iterrows(), key=lambda kv: (sort_key(kv[0][0]), kv[0][1])):
        many = seeds[(series, width)] > 1
        lo = loss.loc[(series, width)]
        rows.append(
            [
                label(series),
                int(width),
                int(seeds[(series, width)]),
                *(spread(r[("median", m)], r[("min", m)], r[("max", m)], 1, many) for m in ("soft_rank", "hard_rank")),
                f"{r[('median', 'hard_rank')] / width:.3f}",
                spread(lo.val_loss, lo.val_loss_min, lo.val_loss_max, 3, many),
            ]
        )
    return table(["arm", "width", "seeds", "soft rank R1", "hard rank R2", "R2 / width", "val loss"], rows)


def betas_table(report: dict) -> str:
    paper = pd.read_csv(PAPER).set_index(["optimizer_variant", "metric"])

    def pub(opt: str, metric: str) -> str:
        if (opt, metric) not in paper.index:
            return "—"
        p = paper.loc[(opt, metric)]
        return f"{p.beta:.2f} [{p.beta_lower:.2f}, {p.beta_upper:.2f}]"

    rows = []
    for b in sorted(report["betas"], key=lambda b: sort_key(b["series"])):
        if b["site"] != "post" or b["bucket"] != "all":
            continue
        opt = b["series"].split("·")[0].strip()
        main = label(b["series"]) == NAMES.get(opt)
        rows.append(
            [
                label(b["series"]),
                b["n_widths"],
                ci(b["beta_soft"]),
                ci(b["beta_hard"]),
                ci(b["beta_delta"]),
                pub(opt, "soft_rank") if main else "—",
                pub(opt, "hard_rank") if main else "—",
            ]
        )
    return table(["arm", "widths", "ours β_soft", "ours β_hard", "ours Δβ", "paper β_soft", "paper β_hard"], rows)


def regime_betas_table(report: dict) -> str:
    by = {}
    for b in report["q4_regimes"]["betas"]:
        if b["site"] == "post":
            by.setdefault(b["series"], {})[b["bucket"]] = b
    return table(
        ["arm", "HEAD β_hard", "MID β_hard", "TAIL β_hard", "TAIL β_soft"],
        [
            [
                label(s),
                *(ci(d.get(k, {}).get("beta_hard")) for k in ("head", "mid", "tail")),
                ci(d.get("tail", {}).get("beta_soft")),
            ]
            for s, d in sorted(by.items(), key=lambda kv: sort_key(kv[0]))
        ],
    )


def regime_capacity_table(report: dict) -> str:
    cap = {}
    for c in report["q4_regimes"]["bucket_capacity"]:
        cap.setdefault((c["series"], c["width"]), {})[c["bucket"]] = c

    def cell(c: dict | None) -> str:
        if c is None:
            return "—"
        return f"{c['hard_rank']:.1f}" + (f" ({c['val_loss']:.2f})" if c.get("val_loss") is not None else "")

    return table(
        ["arm", "width", "HEAD", "MID", "TAIL"],
        [
            [label(s), w, *(cell(d.get(k)) for k in ("head", "mid", "tail"))]
            for (s, w), d in sorted(cap.items(), key=lambda kv: (sort_key(kv[0][0]), kv[0][1]))
        ],
    )


def pairs_table(report: dict) -> str:
    return table(
        ["width", "a", "b", "val loss a / b", "R1 a / b", "R2 a / b", "geometry"],
        [
            [
                p["width"],
                label(p["series_a"]),
                label(p["series_b"]),
                f"{p['val_loss_a']:.3f} / {p['val_loss_b']:.3f}",
                f"{p['soft_rank_all_a']:.1f} / {p['soft_rank_all_b']:.1f}",
                f"{p['hard_rank_all_a']:.1f} / {p['hard_rank_all_b']:.1f}",
                p["geometry"],
            ]
            for p in report["q2_matched_loss"]["pairs"]
        ],
    )


def effects_table(report: dict) -> str:
    def name(x: str) -> str:  # an optimizer setting gets its label; an architecture ("pos=none") stays
        return x if x.startswith("pos=") else label(x)

    q = report["q5_optimizer_architecture"]
    out = table(
        ["effect", "within", "β", "span", "highest (β)", "lowest (β)", "shared widths"],
        [
            [
                e["kind"],
                name(e["within"]),
                e["metric"],
                f"{e['span']:.2f}",
                f"{name(e['highest'])} ({e['beta_highest']:.2f})",
                f"{name(e['lowest'])} ({e['beta_lowest']:.2f})",
                ", ".join(map(str, e["widths"])),
            ]
            for e in q["effects"]
        ],
    )
    summary = table(
        ["β", "median optimizer span", "median architecture span", "larger"],
        [
            [r["metric"], f"{r['optimizer_span']:.2f}", f"{r['architecture_span']:.2f}", r["larger"]]
            for r in q["summary"]
            if r["larger"]
        ],
    )
    return out + "\n\n" + summary


def posthoc_tables(results: Path) -> str:
    ranks = pd.read_csv(results / "posthoc_ranks.csv")
    ranks = ranks[ranks.site == "post"]
    wide = ranks.pivot_table(
        index=["series", "width"], columns="bucket", values=["soft_rank", "hard_rank"], aggfunc="median"
    )
    seeds = ranks[ranks.bucket == "all"].groupby(["series", "width"]).seed.nunique()
    rows = [
        [
            label(s),
            w,
            seeds[(s, w)],
            f"{r[('soft_rank', 'all')]:.1f}",
            f"{r[('hard_rank', 'all')]:.1f}",
            f"{r[('hard_rank', 'tail')]:.1f}",
        ]
        for (s, w), r in sorted(wide.iterrows(), key=lambda kv: (sort_key(kv[0][0]), kv[0][1]))
    ]
    out = table(["arm", "width", "seeds", "R1", "R2", "TAIL R2"], rows)
    betas = pd.read_csv(results / "posthoc_betas.csv")
    betas = betas[betas.site == "post"]

    def fit(s: str, bucket: str, metric: str) -> str:
        row = betas[(betas.series == s) & (betas.bucket == bucket) & (betas.metric == metric)]
        if row.empty or pd.isna(row.beta.iloc[0]):
            return "not fittable"
        r = row.iloc[0]
        return f"{r.beta:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"

    series = sorted(betas.series.unique(), key=sort_key)
    n = betas[(betas.bucket == "all") & (betas.metric == "hard_rank")].set_index("series").n
    out += "\n\n" + table(
        ["arm", "points", "β_soft", "β_hard", "TAIL β_hard"],
        [
            [
                label(s),
                int(n.get(s, 0)),
                fit(s, "all", "soft_rank"),
                fit(s, "all", "hard_rank"),
                fit(s, "tail", "hard_rank"),
            ]
            for s in series
        ],
    )
    return out


def steps_arm_table(report: dict) -> str:
    """The 2×-steps AdamW runs next to Muon's runs of the base budget and the same width, run by run.

    Arms are picked by the runs' own fields (optimizer, steps, position encoding), not by label.
    """
    runs = {r["run_id"]: r for r in report["runs"]}
    rope = [r for r in runs.values() if r["pos"] == "rope"]
    base = min(r["steps"] for r in rope)
    arm = {r["run_id"] for r in rope if r["optimizer"] == "adamw" and r["steps"] == 2 * base}
    muon = {r["run_id"] for r in rope if r["optimizer"] == "muon" and r["steps"] == base}
    phase = {p["run_id"]: p for p in report["q3_asymmetry"]["phase"]}
    widths = {runs[i]["width"] for i in arm if i in phase}
    rows = sorted(
        (phase[i] for i in arm | muon if i in phase and runs[i]["width"] in widths),
        key=lambda p: (p["width"], p["run_id"] in muon, p["seed"]),
    )
    return table(
        ["width", "arm", "seed", "val loss", "R1", "R2"],
        [
            [
                p["width"],
                label(p["series"]),
                p["seed"],
                f"{runs[p['run_id']]['final_val_loss']:.3f}",
                f"{p['soft_frac'] * p['width']:.1f}",
                f"{p['hard_frac'] * p['width']:.1f}",
            ]
            for p in rows
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="the folder with report.json and the post-hoc CSVs")
    args = ap.parse_args()
    report = json.loads((args.results / "report.json").read_text())
    sections = {
        "Coverage (finished seeds per arm and FFN width)": coverage_table(report),
        "What ran": runs_table(report),
        "1. Ranks per width (post-activation, all tokens; seed median (min–max))": ranks_table(report),
        "2. Exponents (post-activation, all tokens)": betas_table(report),
        "2. Exponents per regime (post-activation)": regime_betas_table(report),
        "2. Hard rank per regime (regime val loss)": regime_capacity_table(report),
        "2b. Post hoc, 65,536 validation tokens": posthoc_tables(args.results),
        "3. Matched-loss pairs": pairs_table(report),
        "3. The 2×-steps arm and Muon, run by run": steps_arm_table(report),
        "5. Optimizer vs architecture (spans of β on shared widths)": effects_table(report),
    }
    for title, body in sections.items():
        print(f"## {title}\n\n{body}\n")
    phase = report["q3_asymmetry"]["phase"]
    counts = pd.Series([p["region"] for p in phase]).value_counts()
    print("## 4. Phase regions\n\n" + ", ".join(f"{n} {r}" for r, n in counts.items()) + "\n")
    print(
        table(
            ["run", "region", "R1 / width", "R2 / width"],
            [
                [p["name"], p["region"], f"{p['soft_frac']:.3f}", f"{p['hard_frac']:.3f}"]
                for p in phase
                if p["region"] != "compact"
            ],
        )
        + "\n"
    )
    print(
        f"## Reliability\n\n{len(report['reliability']['low_nd'])} of {report['reliability']['n_aggregates']} "
        "aggregates rest on records with N/D < 10\n"
    )


if __name__ == "__main__":
    main()
