"""Verdict helpers shared by the question sections (``capscale.report.sections``).

Each answer: ``question``, ``verdict`` (``resolved`` / ``not resolved`` / ``not measured``),
a one-sentence ``finding`` and the ``figures`` behind it. The rule is the same for every
comparison of two numbers: a difference is *resolved* only when its interval, at the
report's confidence, excludes no difference (0 for a difference of β, 1 for a ratio of
ranks). A sentence never ranks two numbers whose intervals do not settle the order;
instead it says what sample would (``needed``).

Comparisons of optimizers are made within cells (``report.json`` ``design``: every factor but
the optimizer equal). Where several comparisons answer one question (cells, pairs, level and
β), a difference is resolved only when its Holm-adjusted p-value is below the level, and the
answer says over how many it corrected; no answer leads with the largest of many. Each answer
with a difference of β states its minimum detectable difference at 80% power, the differences
its data exclude, and whether they exclude the paper's gap (``power_clause``).

Every helper reads ``report.json``'s dict only, so a verdict says what the pages show.
"""

from __future__ import annotations

import math

from capscale.analysis.fits import resolves
from capscale.spectrum.summary import WELL_SAMPLED

RESOLVED, NOT_RESOLVED, NOT_MEASURED = "resolved", "not resolved", "not measured"
QUESTIONS = {
    "q1": "Does added width become capacity, and does the optimizer change how much?",
    "q2": "At the same loss, is the representation the same?",
    "q3": "Is capacity broad or concentrated in a few directions?",
    "q4": "Where in the data (HEAD / MID / TAIL tokens) does capacity form?",
    "q5": "Which moves capacity more: the optimizer or the architecture?",
}
# Beyond this many times the current runs a difference is reported as out of reach.
_MAX_FACTOR = 25


def f2(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def iv(lo, hi) -> str:
    return f"[{f2(lo)}, {f2(hi)}]"


def ok(*xs) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def excludes(lo, hi, null: float) -> bool:
    """The interval [lo, hi] lies entirely on one side of ``null`` (not degenerate, beyond round-off)."""
    return ok(lo, hi) and resolves(lo, hi, null)


def needed(diff, lo, hi, n_widths: int, n_seeds: int, what: str = "runs", low_nd_width: int | None = None) -> str:
    """What sample would resolve ``diff`` (interval [lo, hi]): the interval shrinks as 1/√n."""
    tokens = (
        f"; and ≥ {WELL_SAMPLED:g}·D tokens per window in every bucket (N/D ≥ {WELL_SAMPLED:g}: "
        f"{int(WELL_SAMPLED * low_nd_width):,} at width {low_nd_width})"
        if low_nd_width
        else ""
    )
    if not ok(lo, hi):
        return f"an interval needs at least 3 widths with finite ranks per series{tokens}"
    half = (hi - lo) / 2
    factor = (half / abs(diff)) ** 2 if diff else math.inf
    if factor > _MAX_FACTOR:
        return (
            f"the difference is small against its uncertainty (±{f2(half)}): even {_MAX_FACTOR}× the {what} "
            f"would only narrow that to ±{f2(half / math.sqrt(_MAX_FACTOR))}{tokens}"
        )
    seeds = max(n_seeds + 1, math.ceil(max(n_seeds, 1) * factor))
    return (
        f"about {max(factor, 1.5):.1f}× the {what} would be needed (e.g. {seeds} seeds at each of the "
        f"{n_widths} widths){tokens}"
    )


def beta_tuple(b: dict, kind: str = "hard") -> tuple:
    x = b[f"beta_{kind}"]
    return x["beta"], x["ci_low"], x["ci_high"], x["n"]


def fittable(rows: list[dict], kind: str = "hard") -> list[dict]:
    return [b for b in rows if b[f"beta_{kind}"]["fittable"]]


def min_seeds(d: dict) -> int:
    runs = d["runs"]
    counts: dict = {}
    for r in runs:
        counts[(r["series"], r["width"])] = counts.get((r["series"], r["width"]), 0) + 1
    return min(counts.values()) if counts else 0


def low_nd_width(d: dict, buckets=("all",)) -> int | None:
    widths = [r["width"] for r in d["reliability"]["low_nd"] if r["bucket"] in buckets]
    return max(widths) if widths else None


def answer_for(key: str, verdict: str, finding: str, figures: list[str]) -> dict:
    return {"id": key, "question": QUESTIONS[key], "verdict": verdict, "finding": finding, "figures": figures}


def contrasts(d: dict, metric: str, bucket: str = "all") -> list[dict]:
    q = d.get("design") or {}
    return [
        r for r in q.get("contrasts", []) if r["site"] == q["site"] and r["bucket"] == bucket and r["metric"] == metric
    ]


def pooled(d: dict, metric: str, bucket: str = "all") -> list[dict]:
    q = d.get("design") or {}
    return [
        r
        for r in q.get("pooled", [])
        if r["site"] == q["site"] and r["bucket"] == bucket and r["metric"] == metric and r.get("n_cells")
    ]


def span(xs: list[float]) -> str:
    xs = [x for x in xs if ok(x)]
    if not xs:
        return "n/a"
    lo, hi = min(xs), max(xs)
    return f2(lo) if f"{lo:.2f}" == f"{hi:.2f}" else f"{f2(lo)}–{f2(hi)}"


def power_clause(rows: list[dict], what: str = "Δβ_hard", max_pairs: int = 3) -> str:
    """Per pair of treatments: what the design could see (MDE at 80% power), what its data exclude
    (the intervals' far bounds) and whether they exclude the paper's gap, over the pair's cells."""
    pairs: dict[tuple, list[dict]] = {}
    for r in rows:
        pairs.setdefault((r["a"], r["b"]), []).append(r)
    out = []
    for (a, b), rs in list(pairs.items())[:max_pairs]:
        judged = [r for r in rs if ok(r.get("low"), r.get("high"))]
        if not judged:
            out.append(f"{b} − {a}: one seed, so no interval over seeds and no {what} difference can be judged")
            continue
        far = [max(abs(r["low"]), abs(r["high"])) for r in judged]
        text = (
            f"{b} − {a} ({len(judged)} cell(s)): minimum detectable {what} at 80% power "
            f"{span([r['mde'] for r in judged])}"
        )
        holm = [r["mde_holm"] for r in judged if r.get("mde_holm") is not None]
        if holm and span(holm) != span([r["mde"] for r in judged]):  # one cell per family: no correction
            text += f" ({span(holm)} at Holm's α/m)"
        text += f", the data exclude |{what}| beyond {span(far)}"
        refs = [r for r in judged if r.get("reference") is not None]
        if refs:
            n_ex = sum(bool(r["excludes_reference"]) for r in refs)
            text += f", the paper's gap {f2(refs[0]['reference'])} is excluded in {n_ex} of {len(refs)}"
        if len(judged) < len(rs):
            text += f" ({len(rs) - len(judged)} cell(s) with one seed: no interval over seeds)"
        out.append(text)
    if len(pairs) > max_pairs:
        out.append(f"{len(pairs) - max_pairs} more pair(s) in the design table")
    return "; ".join(out)


def pooled_clause(d: dict, metric: str, what: str, bucket: str = "all") -> str:
    out = []
    for p in pooled(d, metric, bucket):
        if p["n_cells"] < 2:
            continue
        out.append(
            f"pooled over {p['n_cells']} cells (fixed-effect) {what} {p['b']} − {p['a']} = {f2(p['diff'])} "
            f"{iv(p['low'], p['high'])}, I² {p['i2']:.0%}"
        )
    return "; ".join(out)


def series_treatment(d: dict) -> dict:
    return {r["series"]: r.get("label", r["series"]) for r in d["runs"]}


def within_cells(d: dict, bucket: str = "all", what: str = "β_hard", metric: str = "hard_rank") -> dict:
    """The level and β comparisons of one bucket, Holm-adjusted together: the answer's family."""
    from capscale.analysis.power import holm

    levels = [r for r in d["levels"] if r["bucket"] == bucket and r["metric"] == metric]
    betas = contrasts(d, metric, bucket)
    # with one seed a level's interval is over widths only: shown, never a verdict (the seed is the replicate)
    pvals = [r.get("p") if r.get("n_seeds", 0) >= 2 else None for r in levels] + [r.get("p") for r in betas]
    adj = holm([math.nan if p is None else p for p in pvals])
    alpha = 1 - d["parameters"]["confidence"]
    hit = [ok(p) and p < alpha for p in adj]
    family = sum(1 for p in pvals if p is not None and math.isfinite(p))
    return {
        "levels": levels,
        "betas": betas,
        "family": family,
        "level_hits": [r for r, h in zip(levels, hit[: len(levels)]) if h],
        "beta_hits": [r for r, h in zip(betas, hit[len(levels) :]) if h],
    }
