"""Print the tables of docs/replication.md's `cpu-long` section from the committed export.

    python scripts/cpu_long_tables.py docs/results/cpu-long

Reads ``report/report.json`` (``capscale report`` of the export) and the runs'
``config.json`` (their token budgets). A cell is one d_model and one step budget (the
report's ``design.cells``: every factor but the optimizer equal); Muon and AdamW are
compared within a cell only. From report.json, only rounded:

- ``betas``: β per series at the final aggregate (median of the last 3 logged steps within
  the final 20% of each run, then over layers; OLS over widths, seeds as replicate points);
- ``design.contrasts``: Δβ = β_Muon − β_AdamW per cell, the mean over seeds of per-seed β,
  Welch t-interval over the 3 + 3 seeds, ``holm_p`` over the 6 cells of one site × bucket ×
  metric, ``mde`` (80% power at α = 0.05), ``mde_holm`` (at α/6: what a lone effect needs to
  survive Holm), the paper's gap and whether the interval excludes it; ``design.pooled``:
  the fixed-effect mean over cells with Cochran's Q and I²;
- ``levels``: Muon's rank over AdamW's per cell (geometric mean over widths, t-interval over
  widths), ``holm_p`` over the 6 cells;
- ``beta_trajectory``: β and Δβ at every shared step (one pooled fit per step, seeds and widths
  as points, uncorrected for the number of steps), and its ``separation`` sentences;
- ``answers``: the report's verdicts, verbatim.

One quantity is derived here: how the within-cell gap changes from one cell to another
(more tokens per parameter, a larger d_model), the treatment × factor interaction
Δβ(cell b) − Δβ(cell a) of ``capscale.analysis.perlayer.interaction`` (Welch–Satterthwaite
interval; each Δβ stays a within-cell comparison), Holm-corrected over the comparisons of
its table and metric.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pandas as pd

from capscale.analysis.perlayer import interaction
from capscale.analysis.power import holm, mde_holm

SITE, BUCKET = "post", "all"
METRICS = {"hard": ("hard_rank", "β_hard"), "soft": ("soft_rank", "β_soft")}
OPTS = ("adamw", "muon")


def cell(series: str) -> tuple[str, int, int]:
    """'muon · 560 steps · d_model=32' → ('muon', 560, 32)."""
    opt = series.split("·")[0].strip()
    steps = int(re.search(r"(\d+) steps", series).group(1))
    return opt, steps, int(re.search(r"d_model=(\d+)", series).group(1))


def num(v, nd: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


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


def _frame(rows) -> pd.DataFrame:
    """report.json rows as a frame, JSON nulls as NaN in numeric columns."""
    out = pd.DataFrame(rows)
    for col in out.columns:
        if out[col].map(lambda v: v is None or isinstance(v, (int, float))).all():
            out[col] = out[col].astype(float)
    return out


class Study:
    def __init__(self, results: Path):
        report = json.loads((results / "report" / "report.json").read_text())
        self.report = report
        bt = report["beta_trajectory"]
        self.all_fits = pd.DataFrame(bt["fits"])
        self.all_pairs = pd.DataFrame(bt["pairs"])
        self.fits = self.all_fits[(self.all_fits.site == SITE) & (self.all_fits.bucket == BUCKET)]
        self.pairs = self.all_pairs[(self.all_pairs.site == SITE) & (self.all_pairs.bucket == BUCKET)]
        self.separation = bt["separation"]
        self.runs = pd.DataFrame(report["runs"])
        self.betas = report["betas"]
        design = report["design"]
        self.contrasts = _frame(design["contrasts"])
        self.pooled = _frame(design["pooled"])
        self.design_cells = pd.DataFrame(design["cells"])
        self.levels = _frame(report["levels"])
        self.tpp = tokens_per_param(results)
        self.cells = sorted({cell(s)[1:] for s in self.fits.series}, key=lambda c: (c[1], c[0]))  # (steps, d)

    def series(self, opt: str, steps: int, d: int) -> str:
        return next(s for s in self.fits.series.unique() if cell(s) == (opt, steps, d))

    def cell_name(self, steps: int, d: int) -> str:
        """The design's name of the cell, e.g. 'd_model=32 · 140 steps'."""
        c = self.design_cells
        return c[(c.d_model.astype(int) == d) & (c.steps.astype(int) == steps)].cell.iloc[0]

    def beta(self, opt: str, steps: int, d: int, metric: str, bucket: str = BUCKET) -> dict:
        series = self.series(opt, steps, d)
        row = next(b for b in self.betas if b["series"] == series and b["site"] == SITE and b["bucket"] == bucket)
        return row["beta_hard" if metric == "hard_rank" else "beta_soft"]

    def contrast(self, steps: int, d: int, metric: str, bucket: str = BUCKET) -> pd.Series:
        c = self.contrasts
        sel = c[(c.site == SITE) & (c.bucket == bucket) & (c.metric == metric) & (c.cell == self.cell_name(steps, d))]
        (row,) = sel.itertuples(index=False)
        return pd.Series(row._asdict())

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


def exponents_table(s: Study) -> str:
    """β per series at the final aggregate, post-activation, all tokens (report.json ``betas``)."""
    rows = []
    for steps, d in s.cells:
        row = [d, f"{s.tpp[(d, steps)]:.1f}", f"{steps:,}"]
        for metric, _ in METRICS.values():
            for opt in OPTS:
                b = s.beta(opt, steps, d, metric)
                row.append(ci(b["beta"], b["ci_low"], b["ci_high"]))
        rows.append(row)
    header = ["d_model", "tokens / param", "steps"]
    header += [f"{name} {o}" for _, name in METRICS.values() for o in ("AdamW", "Muon")]
    return table(header, rows)


def far(r) -> float:
    """The data exclude every |difference| beyond this: the interval's bound farthest from 0."""
    return max(abs(r["low"]), abs(r["high"])) if math.isfinite(r["low"]) else math.nan


def reference(r) -> str:
    if r.get("reference") is None or not math.isfinite(r["reference"]):
        return "—"
    return f"{r['reference']:.2f}: {'excluded' if r['excludes_reference'] else 'not excluded'}"


def gap_per_cell_table(s: Study) -> str:
    """Δβ = β_Muon − β_AdamW within each cell (design.contrasts): what the data resolve and exclude."""
    rows = []
    for _, name in METRICS.values():
        metric = "hard_rank" if name == "β_hard" else "soft_rank"
        for steps, d in s.cells:
            r = s.contrast(steps, d, metric)
            rows.append(
                [
                    f"Δ{name}",
                    d,
                    f"{s.tpp[(d, steps)]:.1f}",
                    ci(r["diff"], r["low"], r["high"]),
                    num(r["p"], 3),
                    num(r["holm_p"], 3),
                    num(far(r)),
                    num(r["mde"]),
                    num(r["mde_holm"]),
                    reference(r),
                ]
            )
    header = [
        "exponent",
        "d_model",
        "tokens / param",
        "Muon − AdamW [95%]",
        "p",
        "Holm p (6 cells)",
        "excludes beyond ±",
        "MDE 80%, α = 0.05",
        "MDE 80%, α/6 (Holm)",
        "paper's gap",
    ]
    return table(header, rows)


def pooled_table(s: Study) -> str:
    """The fixed-effect pooled Δβ over the 6 cells (design.pooled), post-activation, per bucket."""
    rows = []
    for bucket in ("all", "head", "mid", "tail"):
        for _, name in METRICS.values():
            metric = "hard_rank" if name == "β_hard" else "soft_rank"
            p = s.pooled
            (r,) = p[(p.site == SITE) & (p.bucket == bucket) & (p.metric == metric)].to_dict("records")
            rows.append(
                [
                    bucket.upper(),
                    f"Δ{name}",
                    ci(r["diff"], r["low"], r["high"]),
                    num(r["mde"]),
                    f"{r['q']:.1f} (p {r['q_p']:.3f})",
                    f"{r['i2']:.0%}",
                ]
            )
    return table(["bucket", "exponent", "pooled Muon − AdamW [95%]", "MDE 80%", "Cochran's Q", "I²"], rows)


def levels_table(s: Study) -> str:
    """Muon's rank over AdamW's per cell (report.json ``levels``), post-activation, per bucket."""
    lv = s.levels
    rows = []
    for steps, d in s.cells:
        row = [d, f"{s.tpp[(d, steps)]:.1f}"]
        for bucket in ("all", "head", "tail"):
            (r,) = lv[(lv.cell == s.cell_name(steps, d)) & (lv.bucket == bucket) & (lv.metric == "hard_rank")].to_dict(
                "records"
            )
            row.append(f"{ci(r['ratio'], r['ratio_low'], r['ratio_high'])} ({num(r['holm_p'], 3)})")
        rows.append(row)
    header = ["d_model", "tokens / param", "hard rank Muon ÷ AdamW (Holm p)", "HEAD", "TAIL"]
    return table(header, rows)


def bucket_table(s: Study) -> str:
    """Δβ (Muon − AdamW, post-activation) per token bucket within each cell, Holm p over its 6 cells."""
    rows = []
    for steps, d in s.cells:
        row = [d, f"{s.tpp[(d, steps)]:.1f}"]
        for metric, _ in METRICS.values():
            for bucket in ("head", "mid", "tail"):
                r = s.contrast(steps, d, metric, bucket)
                row.append(f"{ci(r['diff'], r['low'], r['high'])} ({num(r['holm_p'], 2)})")
        rows.append(row)
    header = ["d_model", "tokens / param"] + [
        f"Δ{n} {b.upper()}" for _, n in METRICS.values() for b in ("head", "mid", "tail")
    ]
    return table(header, rows)


def bucket_count_line(s: Study) -> str:
    """How many of the per-bucket intervals exclude 0, against chance, and how many survive Holm."""
    c = s.contrasts
    sel = c[(c.site == SITE) & c.bucket.isin(["head", "mid", "tail"]) & c.metric.isin(["hard_rank", "soft_rank"])]
    excl = sel[(sel["low"] > 0) | (sel["high"] < 0)]
    held = sel[sel["resolved"].astype(bool)]
    named = "; ".join(
        f"Δβ_{'hard' if r.metric == 'hard_rank' else 'soft'} {r.bucket.upper()} at {r.cell}, "
        f"{ci(r.diff, r.low, r.high)}, Holm p {num(r.holm_p, 3)}"
        for r in held.itertuples()
    )
    return (
        f"Of these {len(sel)} intervals, {len(excl)} exclude 0 ({0.05 * len(sel):.1f} expected by chance at 95%); "
        f"{len(held)} {'survives' if len(held) == 1 else 'survive'} Holm over the 6 cells of its bucket and exponent"
        + (f": {named}." if named else ".")
    )


def asymmetry_table(s: Study) -> str:
    """Δβ = β_soft − β_hard per series (report.json ``betas``, post-activation, all tokens)."""
    rows = []
    for steps, d in s.cells:
        row = [d, f"{s.tpp[(d, steps)]:.1f}"]
        for opt in OPTS:
            series = s.series(opt, steps, d)
            b = next(x for x in s.betas if x["series"] == series and x["site"] == SITE and x["bucket"] == BUCKET)
            f = b["beta_delta"]
            row.append(ci(f["beta"], f["ci_low"], f["ci_high"]))
        rows.append(row)
    return table(["d_model", "tokens / param", "β_soft − β_hard AdamW", "β_soft − β_hard Muon"], rows)


def sampling_line(s: Study) -> str:
    """How many of the final-aggregate fits (every site and bucket) use an N/D < 10 record."""
    fits = [b[k] for b in s.betas for k in ("beta_hard", "beta_soft")]
    low = sum(1 for f in fits if f["n_low_nd"])
    seeds = s.runs.groupby("series").seed.nunique().min()
    return (
        f"Of the {len(fits)} fits at the final aggregates (12 series, both sites, all four buckets, soft and hard), "
        f"{low} use a record with N/D < 10; every series has {seeds} seeds at each of its 3 widths."
    )


def interactions(s: Study, factor: str) -> pd.DataFrame:
    """Δβ(cell b) − Δβ(cell a) for cells that differ in ``factor`` only ('steps' within a d_model,
    'd_model' within a budget in tokens per parameter), Holm over one metric's rows."""
    cells = s.design_cells.copy()
    if factor == "d_model":  # the budgets differ in steps per d_model; equal in tokens per parameter
        cells["tpp"] = [round(s.tpp[(int(d), int(st))]) for d, st in zip(cells.d_model, cells.steps)]
        cells = cells.drop(columns="steps")
    c = s.contrasts[(s.contrasts.site == SITE) & (s.contrasts.bucket == BUCKET)]
    c = c[c.metric.isin([m for m, _ in METRICS.values()])]
    out = interaction(c, cells, factor=factor)
    out["holm_p"] = float("nan")
    out["family_size"] = 0
    for _, idx in out.groupby("metric").groups.items():
        out.loc[idx, "holm_p"] = holm(out.loc[idx, "p"])
        out.loc[idx, "family_size"] = len(idx)
    out["mde_holm"] = [mde_holm(se, df, m) for se, df, m in zip(out.se, out.df, out.family_size)]
    return out


def change_table(s: Study, factor: str) -> str:
    out = interactions(s, factor)
    rows = []
    steps_of = {
        c: (int(st), int(d)) for c, st, d in zip(s.design_cells.cell, s.design_cells.steps, s.design_cells.d_model)
    }
    for _, name in METRICS.values():
        metric = "hard_rank" if name == "β_hard" else "soft_rank"
        sub = out[out.metric == metric]
        for r in sub.to_dict("records"):
            (st_a, d_a), (st_b, d_b) = steps_of[r["shallow"]], steps_of[r["deep"]]
            if factor == "steps":
                what = f"d_model {d_a}: {s.tpp[(d_a, st_a)]:.0f} → {s.tpp[(d_b, st_b)]:.0f} tokens / param"
            else:
                what = f"{s.tpp[(d_a, st_a)]:.0f} tokens / param: d_model {d_a} → {d_b}"
            rows.append(
                [
                    what,
                    f"Δ{name}",
                    f"{num(r['delta_shallow'])} → {num(r['delta_deep'])}",
                    ci(r["diff"], r["low"], r["high"]),
                    num(r["holm_p"], 3),
                    num(far(r)),
                    num(r["mde"]),
                    num(r["mde_holm"]),
                ]
            )
    m = int(out.family_size.max())
    header = [
        "from → to",
        "exponent",
        "Δ (Muon − AdamW)",
        "change [95%]",
        f"Holm p ({m})",
        "excludes beyond ±",
        "MDE 80%",
        f"MDE 80%, α/{m}",
    ]
    return table(header, rows)


def verdict_lines(s: Study) -> str:
    return "\n".join(f"- **{a['id'].upper()} ({a['verdict']})** {a['finding']}" for a in s.report["answers"])


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
        "cpu-long verdicts": verdict_lines(s),
        "cpu-long exponents": exponents_table(s),
        "cpu-long gap per cell": gap_per_cell_table(s),
        "cpu-long gap pooled over cells": pooled_table(s),
        "cpu-long level ratio": levels_table(s),
        "cpu-long gap per token bucket": bucket_table(s) + "\n\n" + bucket_count_line(s),
        "cpu-long asymmetry": asymmetry_table(s),
        "cpu-long gap against tokens per parameter": change_table(s, "steps"),
        "cpu-long gap against d_model": change_table(s, "d_model"),
        "cpu-long gap along the long runs": trajectory_table(s),
        "cpu-long separation": separation_lines(s),
    }
    print("\n\n".join(f"## {title}\n\n{body}" for title, body in sections.items()))


if __name__ == "__main__":
    main()
