"""Print the tables of docs/replication.md's `cpu-long` section from the committed export.

    python scripts/cpu_long_tables.py docs/results/cpu-long

Reads ``report/report.json`` (``capscale report`` of the export; ``beta_trajectory`` holds
β per series and step, and Δβ and the level ratio per pair of series) and the runs'
``config.json`` (their token budgets). Every β, Δβ and ratio is printed as the report
stored it, only rounded. One quantity is derived here: how much the exponent gap Δβ
changes from one cell to another (more tokens per parameter, a larger d_model). The two
Δβ come from disjoint runs, so the change's interval combines their half-widths in
quadrature (normal approximation of two independent t-intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pandas as pd

SITE, BUCKET = "post", "all"
METRICS = {"hard": ("hard_rank", "β_hard"), "soft": ("soft_rank", "β_soft")}


def cell(series: str) -> tuple[str, int, int]:
    """'muon · 560 steps · d_model=32 · n_head=1' → ('muon', 560, 32)."""
    opt, steps, arch = (p.strip() for p in series.split("·")[:3])
    return opt, int(steps.split()[0]), int(re.search(r"d_model=(\d+)", arch).group(1))


def ci(v: float, lo: float, hi: float, nd: int = 2) -> str:
    if not math.isfinite(v):
        return "—"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.{nd}f}"
    return f"{v:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def tokens_per_param(results: Path) -> dict[tuple[int, int], float]:
    """(d_model, steps) → tokens seen per non-embedding parameter of the cell's widest model."""
    from capscale.train.config import RunConfig
    from capscale.train.model import GPT

    widest: dict[int, RunConfig] = {}
    budgets: dict[tuple[int, int], int] = {}
    for path in sorted((results / "runs").glob("*/config.json")):
        cfg = RunConfig.from_dict({k: v for k, v in json.loads(path.read_text()).items() if k != "versions"})
        m = cfg.model_config()
        if m.d_model not in widest or m.ffn_dim > widest[m.d_model].model_config().ffn_dim:
            widest[m.d_model] = cfg
        budgets[(m.d_model, cfg.train.steps)] = cfg.train.batch_size * m.seq_len
    params = {d: GPT(c.model).num_params(non_embedding=True) for d, c in widest.items()}
    return {(d, steps): steps * per_step / params[d] for (d, steps), per_step in budgets.items()}


class Study:
    def __init__(self, results: Path):
        report = json.loads((results / "report" / "report.json").read_text())
        bt = report["beta_trajectory"]
        self.all_fits = pd.DataFrame(bt["fits"])
        self.all_pairs = pd.DataFrame(bt["pairs"])
        self.fits = self.all_fits[(self.all_fits.site == SITE) & (self.all_fits.bucket == BUCKET)]
        self.pairs = self.all_pairs[(self.all_pairs.site == SITE) & (self.all_pairs.bucket == BUCKET)]
        self.separation = bt["separation"]
        self.runs = pd.DataFrame(report["runs"])
        self.tpp = tokens_per_param(results)
        self.cells = sorted({cell(s)[1:] for s in self.fits.series}, key=lambda c: (c[1], c[0]))  # (steps, d)

    def series(self, opt: str, steps: int, d: int) -> str:
        return next(s for s in self.fits.series.unique() if cell(s) == (opt, steps, d))

    def last_step(self, steps: int, d: int) -> int:
        a, m = self.series("adamw", steps, d), self.series("muon", steps, d)
        shared = set(self.fits[self.fits.series == a].step) & set(self.fits[self.fits.series == m].step)
        return max(shared)

    def fit(self, opt: str, steps: int, d: int, metric: str, step: int) -> pd.Series:
        f = self.fits
        sel = f[(f.series == self.series(opt, steps, d)) & (f.metric == metric) & (f.step == step)]
        return sel.iloc[0]

    def pair(self, steps: int, d: int, metric: str, step: int) -> pd.Series:
        p = self.pairs
        sel = p[(p.series_a == self.series("muon", steps, d)) & (p.metric == metric) & (p.step == step)]
        return sel.iloc[0]


def runs_table(s: Study) -> str:
    rows = []
    for steps, d in s.cells:
        sub = s.runs[(s.runs.steps == steps) & (s.runs.d_model == d)]
        done = sub[sub.status == "done"]
        rows.append(
            [
                d,
                f"{steps:,}",
                f"{s.tpp[(d, steps)]:.1f}",
                ", ".join(str(int(w)) for w in sorted(sub.width.unique())),
                len(done),
                ", ".join(str(int(x)) for x in sorted(done.seed.unique())),
            ]
        )
    return table(["d_model", "steps", "tokens / parameter (×4)", "FFN widths", "runs done", "seeds"], rows)


def loss_table(s: Study, results: Path) -> str:
    """Median final validation loss over seeds per width (report.json's runs), and how many
    runs had their lowest validation loss at their last evaluation (metrics.jsonl)."""
    rows = []
    for steps, d in s.cells:
        sub = s.runs[(s.runs.steps == steps) & (s.runs.d_model == d)]
        row = [d, f"{s.tpp[(d, steps)]:.1f}"]
        for opt in ("adamw", "muon"):
            med = sub[sub.optimizer == opt].groupby("width").final_val_loss.median()
            row.append(" / ".join(f"{v:.3f}" for v in med.sort_index()))
        last_best = 0
        for name in sub.run_id:
            records = [
                json.loads(line) for line in (results / "runs" / name / "metrics.jsonl").read_text().splitlines()
            ]
            val = [r["val_loss"] for r in records if "val_loss" in r]
            last_best += val[-1] == min(val)
        row.append(f"{last_best} of {len(sub)}")
        rows.append(row)
    return table(
        ["d_model", "tokens / param", "val loss AdamW ×1 / ×2 / ×4", "val loss Muon ×1 / ×2 / ×4", "lowest at the end"],
        rows,
    )


def final_table(s: Study) -> str:
    rows = []
    for steps, d in s.cells:
        step = s.last_step(steps, d)
        row = [d, f"{s.tpp[(d, steps)]:.1f}", step]
        for key, (metric, _) in METRICS.items():
            for opt in ("adamw", "muon"):
                f = s.fit(opt, steps, d, metric, step)
                row.append(ci(f.beta, f.ci_low, f.ci_high))
            p = s.pair(steps, d, key, step)
            row.append(ci(p.dbeta, p.dbeta_low, p.dbeta_high))
        p = s.pair(steps, d, "hard", step)
        row.append(ci(p.ratio, p.ratio_low, p.ratio_high))
        rows.append(row)
    header = ["d_model", "tokens / param", "step"]
    for _, name in METRICS.values():
        header += [f"{name} AdamW", f"{name} Muon", f"Δ{name} Muon − AdamW"]
    header.append("hard rank Muon ÷ AdamW")
    return table(header, rows)


def bucket_table(s: Study) -> str:
    """Δβ_hard and Δβ_soft (Muon − AdamW, post-activation) per token bucket at each cell's final step."""
    rows = []
    for steps, d in s.cells:
        step = s.last_step(steps, d)
        muon = s.series("muon", steps, d)
        row = [d, f"{s.tpp[(d, steps)]:.1f}"]
        for key in METRICS:
            for bucket in ("head", "mid", "tail"):
                p = s.all_pairs
                r = p[
                    (p.series_a == muon)
                    & (p.metric == key)
                    & (p.step == step)
                    & (p.site == SITE)
                    & (p.bucket == bucket)
                ]
                row.append(ci(r.dbeta.iloc[0], r.dbeta_low.iloc[0], r.dbeta_high.iloc[0]))
        rows.append(row)
    header = ["d_model", "tokens / param"] + [f"Δβ_{k} {b.upper()}" for k in METRICS for b in ("head", "mid", "tail")]
    return table(header, rows)


def sampling_line(s: Study) -> str:
    """How many of the fits the page quotes (every site and bucket, final steps) use an N/D < 10 record."""
    quoted = [(s.series(o, steps, d), s.last_step(steps, d)) for steps, d in s.cells for o in ("adamw", "muon")]
    f = s.all_fits[s.all_fits.metric.isin(["hard_rank", "soft_rank"])]
    sel = f[[(a, b) in quoted for a, b in zip(f.series, f.step)]]
    low = int((sel.n_low_nd > 0).sum())
    return (
        f"Of the {len(sel)} fits at the quoted final steps (both sites, all four buckets, soft and hard), "
        f"{low} use a record with N/D < 10; the smallest number of seeds in a quoted fit is {int(sel.n_seeds.min())}."
    )


def change(s: Study, a: tuple[int, int], b: tuple[int, int], key: str) -> tuple[float, float, float]:
    """Δβ(b) − Δβ(a) at each cell's final step, interval by quadrature of the half-widths."""
    pa, pb = (s.pair(steps, d, key, s.last_step(steps, d)) for steps, d in (a, b))
    delta = pb.dbeta - pa.dbeta
    half = math.hypot((pa.dbeta_high - pa.dbeta_low) / 2, (pb.dbeta_high - pb.dbeta_low) / 2)
    return delta, delta - half, delta + half


def gap_table(s: Study, comparisons: list[tuple[str, tuple[int, int], tuple[int, int]]]) -> str:
    rows = []
    for what, a, b in comparisons:
        row = [what]
        for key in METRICS:
            row.append(ci(*change(s, a, b, key)))
        rows.append(row)
    return table(["from → to", "change of Δβ_hard", "change of Δβ_soft"], rows)


def tokens_comparisons(s: Study) -> list:
    out = []
    for d in sorted({d for _, d in s.cells}):
        budgets = sorted(steps for steps, dd in s.cells if dd == d)
        for lo, hi in zip(budgets, budgets[1:]):
            out.append(
                (
                    f"d_model {d}: {s.tpp[(d, lo)]:.0f} → {s.tpp[(d, hi)]:.0f} tokens / param",
                    (lo, d),
                    (hi, d),
                )
            )
    return out


def dmodel_comparisons(s: Study) -> list:
    out = []
    short = {d: min(steps for steps, dd in s.cells if dd == d) for d in sorted({d for _, d in s.cells})}
    ds = sorted(short)
    for lo, hi in [*zip(ds, ds[1:]), (ds[0], ds[-1])] if len(ds) > 2 else zip(ds, ds[1:]):
        out.append(
            (f"{s.tpp[(lo, short[lo])]:.0f} tokens / param: d_model {lo} → {hi}", (short[lo], lo), (short[hi], hi))
        )
    longs = {d: max(steps for steps, dd in s.cells if dd == d) for d in ds}
    with_long = [d for d in ds if longs[d] != short[d]]
    for lo, hi in zip(with_long, with_long[1:]):
        out.append(
            (f"{s.tpp[(lo, longs[lo])]:.0f} tokens / param: d_model {lo} → {hi}", (longs[lo], lo), (longs[hi], hi))
        )
    return out


TARGETS = (2.5, 5, 10, 16, 20)  # tokens per parameter; 16 = the end of the constant-rate phase


def trajectory_table(s: Study) -> str:
    """Along each long run: β_hard of both optimizers, Δβ_hard and the level ratio, at the
    measured steps nearest to 2.5, 5, 10, 16 (warm-down starts) and 20 tokens per parameter."""
    rows = []
    for steps, d in s.cells:
        budgets = sorted(st for st, dd in s.cells if dd == d)
        if len(budgets) < 2 or steps != budgets[-1]:
            continue
        per_step = s.tpp[(d, steps)] / steps
        shared = sorted(st for st in set(s.fits[s.fits.series == s.series("muon", steps, d)].step) if st > 0)
        for target in TARGETS:
            step = min(shared, key=lambda st: abs(st * per_step - target))
            row = [d, f"{step * per_step:.1f}", step]
            for opt in ("adamw", "muon"):
                f = s.fit(opt, steps, d, "hard_rank", step)
                row.append(ci(f.beta, f.ci_low, f.ci_high))
            p = s.pair(steps, d, "hard", step)
            row += [ci(p.dbeta, p.dbeta_low, p.dbeta_high), ci(p.ratio, p.ratio_low, p.ratio_high)]
            rows.append(row)
    header = ["d_model", "tokens / param", "step", "β_hard AdamW", "β_hard Muon", "Δβ_hard", "hard rank Muon ÷ AdamW"]
    return table(header, rows)


def separation_lines(s: Study) -> str:
    return "\n".join(
        f"- {row['sentence']}"
        for row in s.separation
        if row["site"] == SITE and row["bucket"] == BUCKET and row["metric"] == "hard_rank"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="the export, e.g. docs/results/cpu-long")
    results = ap.parse_args().results
    s = Study(results)
    sections = {
        "cpu-long runs": runs_table(s),
        "cpu-long loss": loss_table(s, results),
        "cpu-long sampling": sampling_line(s),
        "cpu-long exponents at the final step": final_table(s),
        "cpu-long gap per token bucket": bucket_table(s),
        "cpu-long gap against tokens per parameter": gap_table(s, tokens_comparisons(s)),
        "cpu-long gap against d_model": gap_table(s, dmodel_comparisons(s)),
        "cpu-long gap along the long runs": trajectory_table(s),
        "cpu-long separation": separation_lines(s),
    }
    print("\n\n".join(f"## {title}\n\n{body}" for title, body in sections.items()))


if __name__ == "__main__":
    main()
