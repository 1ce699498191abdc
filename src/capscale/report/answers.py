"""One plain verdict per question, computed from ``report.json``'s dict (``answers``).

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
"""

from __future__ import annotations

import math

from capscale.analysis import beta_difference
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


def _ok(*xs) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def excludes(lo, hi, null: float) -> bool:
    """The interval [lo, hi] lies entirely on one side of ``null`` (not degenerate, beyond round-off)."""
    return _ok(lo, hi) and resolves(lo, hi, null)


def needed(diff, lo, hi, n_widths: int, n_seeds: int, what: str = "runs", low_nd_width: int | None = None) -> str:
    """What sample would resolve ``diff`` (interval [lo, hi]): the interval shrinks as 1/√n."""
    tokens = (
        f"; and ≥ {WELL_SAMPLED:g}·D tokens per window in every bucket (N/D ≥ {WELL_SAMPLED:g}: "
        f"{int(WELL_SAMPLED * low_nd_width):,} at width {low_nd_width})"
        if low_nd_width
        else ""
    )
    if not _ok(lo, hi):
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


def _beta(b: dict, kind: str = "hard") -> tuple:
    x = b[f"beta_{kind}"]
    return x["beta"], x["ci_low"], x["ci_high"], x["n"]


def _fittable(rows: list[dict], kind: str = "hard") -> list[dict]:
    return [b for b in rows if b[f"beta_{kind}"]["fittable"]]


def _seeds(d: dict) -> int:
    runs = d["runs"]
    counts: dict = {}
    for r in runs:
        counts[(r["series"], r["width"])] = counts.get((r["series"], r["width"]), 0) + 1
    return min(counts.values()) if counts else 0


def _low_nd_width(d: dict, buckets=("all",)) -> int | None:
    widths = [r["width"] for r in d["reliability"]["low_nd"] if r["bucket"] in buckets]
    return max(widths) if widths else None


def _answer(key: str, verdict: str, finding: str, figures: list[str]) -> dict:
    return {"id": key, "question": QUESTIONS[key], "verdict": verdict, "finding": finding, "figures": figures}


def _contrasts(d: dict, metric: str, bucket: str = "all") -> list[dict]:
    q = d.get("design") or {}
    return [
        r for r in q.get("contrasts", []) if r["site"] == q["site"] and r["bucket"] == bucket and r["metric"] == metric
    ]


def _pooled(d: dict, metric: str, bucket: str = "all") -> list[dict]:
    q = d.get("design") or {}
    return [
        r
        for r in q.get("pooled", [])
        if r["site"] == q["site"] and r["bucket"] == bucket and r["metric"] == metric and r.get("n_cells")
    ]


def _span(xs: list[float]) -> str:
    xs = [x for x in xs if _ok(x)]
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
        judged = [r for r in rs if _ok(r.get("low"), r.get("high"))]
        if not judged:
            out.append(f"{b} − {a}: one seed, so no interval over seeds and no {what} difference can be judged")
            continue
        far = [max(abs(r["low"]), abs(r["high"])) for r in judged]
        text = (
            f"{b} − {a} ({len(judged)} cell(s)): minimum detectable {what} at 80% power "
            f"{_span([r['mde'] for r in judged])}, the data exclude |{what}| beyond {_span(far)}"
        )
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


def _pooled_clause(d: dict, metric: str, what: str, bucket: str = "all") -> str:
    out = []
    for p in _pooled(d, metric, bucket):
        if p["n_cells"] < 2:
            continue
        out.append(
            f"pooled over {p['n_cells']} cells (fixed-effect) {what} {p['b']} − {p['a']} = {f2(p['diff'])} "
            f"{iv(p['low'], p['high'])}, I² {p['i2']:.0%}"
        )
    return "; ".join(out)


def _series_treatment(d: dict) -> dict:
    return {r["series"]: r.get("label", r["series"]) for r in d["runs"]}


def within_cells(d: dict, bucket: str = "all", what: str = "β_hard", metric: str = "hard_rank") -> dict:
    """The level and β comparisons of one bucket, Holm-adjusted together: the answer's family."""
    from capscale.analysis.power import holm

    levels = [r for r in d["levels"] if r["bucket"] == bucket and r["metric"] == metric]
    betas = _contrasts(d, metric, bucket)
    # with one seed a level's interval is over widths only: shown, never a verdict (the seed is the replicate)
    pvals = [r.get("p") if r.get("n_seeds", 0) >= 2 else None for r in levels] + [r.get("p") for r in betas]
    adj = holm([math.nan if p is None else p for p in pvals])
    alpha = 1 - d["parameters"]["confidence"]
    hit = [_ok(p) and p < alpha for p in adj]
    family = sum(1 for p in pvals if p is not None and math.isfinite(p))
    return {
        "levels": levels,
        "betas": betas,
        "family": family,
        "level_hits": [r for r, h in zip(levels, hit[: len(levels)]) if h],
        "beta_hits": [r for r, h in zip(betas, hit[len(levels) :]) if h],
    }


def _level_text(r: dict, names: dict) -> str:
    return (
        f"{r['cell']}: {names.get(r['series'], r['series'])} {f2(r['ratio'])}× {iv(r['ratio_low'], r['ratio_high'])} "
        f"{names.get(r['baseline'], r['baseline'])}"
    )


def q1(d: dict) -> dict:
    fits = _fittable(d["q1_scaling"]["fits"])
    fam = within_cells(d)
    levels, betas = fam["levels"], fam["betas"]
    if not fits and not levels:
        return _answer("q1", NOT_MEASURED, "No series has ranks at 3 or more widths, so no β can be fitted.", [])
    if not levels and not betas:  # one treatment: does its rank grow with width?
        b = fits[0]["beta_hard"]
        grows = excludes(b["ci_low"], b["ci_high"], 0)
        text = f"{fits[0]['series']}: β_hard {f2(b['beta'])} {iv(b['ci_low'], b['ci_high'])}, " + (
            "rank grows with width" if grows else "growth with width not resolved"
        )
        if b.get("interval_over", "seeds") != "seeds":
            text += " (one seed: the interval is over widths only, not over seeds)"
        return _answer("q1", RESOLVED if grows else NOT_RESOLVED, text + ".", ["scaling"])
    names = _series_treatment(d)
    cells = sorted({r["cell"] for r in levels} | {r["cell"] for r in betas})
    parts = [
        f"Compared within {len(cells)} cell(s) (every factor but the optimizer equal), Holm-corrected over "
        f"{fam['family']} comparison(s) of hard-rank level and β_hard"
    ]
    if fam["level_hits"]:
        parts.append(
            f"the hard-rank level differs in {len(fam['level_hits'])} of {len(levels)}: "
            + "; ".join(_level_text(r, names) for r in fam["level_hits"])
        )
    elif levels:
        parts.append(
            f"no hard-rank level difference survives the correction (ratios {_span([r['ratio'] for r in levels])}×)"
            + ("; one seed: level intervals are over widths only and decide nothing" if _seeds(d) < 2 else "")
        )
    if fam["beta_hits"]:
        parts.append(
            f"β_hard differs in {len(fam['beta_hits'])} of {len(betas)}: "
            + "; ".join(
                f"{r['cell']}: {r['b']} − {r['a']} {f2(r['diff'])} {iv(r['low'], r['high'])}" for r in fam["beta_hits"]
            )
        )
    elif betas:
        parts.append(f"no β_hard difference survives it (Δβ_hard {_span([r['diff'] for r in betas])})")
    pooled = _pooled_clause(d, "hard_rank", "Δβ_hard")
    if pooled:
        parts.append(pooled)
    if betas:
        parts.append(power_clause(betas))
    verdict = RESOLVED if fam["level_hits"] or fam["beta_hits"] else NOT_RESOLVED
    return _answer("q1", verdict, "; ".join(parts) + ".", ["scaling", "levels"])


def q2(d: dict) -> dict:
    q = d["q2_matched_loss"]
    pairs = q["pairs"]
    if not any(r.get("final_val_loss") is not None for r in d["training"]["final"]):
        return _answer(
            "q2",
            NOT_MEASURED,
            "Validation loss not measured: no run logged one (a training loop's callback reads it by the key given "
            "as val_loss_key=), so runs cannot be matched by loss.",
            ["matched_loss"],
        )
    if not pairs:
        return _answer(
            "q2",
            NOT_MEASURED,
            f"No two series reach the same final validation loss within {q['tolerance']:g} nats at a common width, "
            "so equal-loss geometry cannot be compared; a matched arm is needed (e.g. the slower optimizer "
            "trained for more steps, as the cpu preset's AdamW 2×-steps arm).",
            ["matched_loss"],
        )
    known = [p for p in pairs if p["geometry"] != "unknown"]
    hits = _q2_hits(pairs, 1 - d["parameters"]["confidence"])
    if hits:
        p, what = hits[0]
        n_pairs = len({id(x) for x, _ in hits})
        return _answer(
            "q2",
            RESOLVED,
            f"Same loss, different representation in {n_pairs} of {len(pairs)} matched pair(s), Holm-corrected over "
            f"the {4 * len(pairs)} comparisons (rank ratios R1, R2 and β_soft, β_hard differences of every pair): e.g. "
            f"at width {p['width']}, where {p['series_b']} and {p['series_a']} end {f2(abs(p['loss_diff']))} nats "
            f"apart, {what}.",
            ["matched_loss"],
        )
    if not known:
        return _answer(
            "q2",
            NOT_RESOLVED,
            f"{len(pairs)} matched pair(s), but neither β (≥ 3 widths per series) nor a rank ratio at the matched "
            "width (≥ 2 seeds per series) can be judged for any of them.",
            ["matched_loss"],
        )
    p = known[0]
    return _answer(
        "q2",
        NOT_RESOLVED,
        f"In none of the {len(pairs)} matched pair(s) does a rank ratio or β difference survive a Holm correction "
        f"over the {4 * len(pairs)} comparisons, so these data cannot tell the representations apart "
        f"(e.g. width {p['width']}: {_pair_difference(p)}); "
        + needed(
            math.log(p["hard_ratio"]) if _ok(p.get("hard_ratio")) else p["hard_diff"],
            math.log(p["hard_ratio_low"]) if _ok(p.get("hard_ratio_low")) else p["hard_diff_low"],
            math.log(p["hard_ratio_high"]) if _ok(p.get("hard_ratio_high")) else p["hard_diff_high"],
            len(d["sweep"]["widths"]),
            _seeds(d),
        )
        + ".",
        ["matched_loss"],
    )


def _q2_hits(pairs: list[dict], alpha: float) -> list[tuple[dict, str]]:
    """(pair, the measure that differs, in words) for every comparison that survives Holm over all pairs ×
    {R1 ratio, R2 ratio, β_soft, β_hard difference}; p-values from each interval (normal approximation,
    conservative for t-intervals)."""
    from scipy import stats

    from capscale.analysis.power import holm

    z = stats.norm.ppf(1 - alpha / 2)
    rows = []
    for p in pairs:
        for kind, rank in (("soft", "R1"), ("hard", "R2")):
            est, lo, hi = (p.get(f"{kind}_ratio{e}") for e in ("", "_low", "_high"))
            if _ok(est, lo, hi) and min(est, lo, hi) > 0:
                se = (math.log(hi) - math.log(lo)) / (2 * z)
                pv = 2 * stats.norm.sf(abs(math.log(est)) / se) if se > 0 else math.nan
                text = f"{p['series_b']}'s {rank} is {f2(est)}× {iv(lo, hi)} {p['series_a']}'s"
            else:
                pv, text = math.nan, ""
            rows.append((p, pv, text))
            est, lo, hi = (p.get(f"{kind}_diff{e}") for e in ("", "_low", "_high"))
            if _ok(est, lo, hi):
                se = (hi - lo) / (2 * z)
                pv = 2 * stats.norm.sf(abs(est) / se) if se > 0 else math.nan
                text = f"β_{kind} differs by {f2(est)} {iv(lo, hi)} ({p['series_b']} − {p['series_a']})"
            else:
                pv, text = math.nan, ""
            rows.append((p, pv, text))
    adj = holm([pv for _, pv, _ in rows])
    return [(p, text) for (p, _, text), q in zip(rows, adj) if _ok(q) and q < alpha]


def _pair_difference(p: dict) -> str:
    """The matched pair's hard-rank ratio at its width and its β_hard difference, with intervals."""
    parts = []
    if _ok(p.get("hard_ratio")):
        parts.append(
            f"{p['series_b']}'s hard rank is {f2(p['hard_ratio'])}× "
            f"{iv(p.get('hard_ratio_low'), p.get('hard_ratio_high'))} {p['series_a']}'s"
        )
    if _ok(p.get("hard_diff")):
        parts.append(f"β_hard differs by {f2(p['hard_diff'])} {iv(p['hard_diff_low'], p['hard_diff_high'])}")
    return " and ".join(parts) or "nothing can be compared"


def q3(d: dict) -> dict:
    conf = d["parameters"]["confidence"]
    fits = _fittable(d["q3_asymmetry"]["delta_beta"], "delta")
    counts: dict[str, int] = {}
    for r in d["q3_asymmetry"]["region_counts"]:
        counts[r["region"]] = counts.get(r["region"], 0) + r["n_runs"]
    phase = "phase map: " + ", ".join(f"{n} run(s) {reg}" for reg, n in sorted(counts.items()))
    if not fits:
        return _answer("q3", NOT_MEASURED, f"No Δβ is fittable (needs ≥ 3 widths); {phase}.", ["phase_map"])
    positive = [
        b
        for b in fits
        if excludes(b["beta_delta"]["ci_low"], b["beta_delta"]["ci_high"], 0) and b["beta_delta"]["ci_low"] > 0
    ]
    negative = [
        b
        for b in fits
        if excludes(b["beta_delta"]["ci_low"], b["beta_delta"]["ci_high"], 0) and b["beta_delta"]["ci_high"] < 0
    ]
    settled = len(positive) + len(negative) == len(fits)
    undecided = len(fits) - len(positive) - len(negative)
    parts = []
    if positive:
        parts.append(
            f"the soft rank grows faster than the hard rank (Δβ > 0: spectra concentrate with width) for "
            f"{len(positive)} of {len(fits)} series"
        )
    if negative:
        parts.append(f"slower (Δβ < 0: spectra spread with width) for {len(negative)} of {len(fits)}")
    if undecided:
        open_ = [b for b in fits if b not in positive and b not in negative]
        listed = ", ".join(
            f"{b['series']} {f2(b['beta_delta']['beta'])} {iv(b['beta_delta']['ci_low'], b['beta_delta']['ci_high'])}"
            for b in open_[:3]
        ) + (f", and {len(open_) - 3} more in the table" if len(open_) > 3 else "")
        parts.append(f"Δβ is not distinguishable from 0 for {undecided} of {len(fits)} series ({listed})")
    sign = "; ".join(parts)
    verdict = RESOLVED if settled else NOT_RESOLVED
    deltas = _contrasts(d, "delta_beta")
    if deltas:
        alpha = 1 - conf
        hits = [r for r in deltas if _ok(r.get("holm_p")) and r["holm_p"] < alpha]
        if hits:
            verdict = RESOLVED
            sign += "; within cells (Holm over {}) the optimizers' Δβ differ in {} of {}: {}".format(
                deltas[0]["family_size"],
                len(hits),
                len(deltas),
                "; ".join(f"{r['cell']}: {r['b']} − {r['a']} {f2(r['diff'])} {iv(r['low'], r['high'])}" for r in hits),
            )
        else:
            sign += (
                f"; within cells no difference of Δβ between optimizers survives a Holm correction over "
                f"{deltas[0]['family_size']} (differences {_span([r['diff'] for r in deltas])}; "
                + power_clause(deltas, "Δβ difference")
                + ")"
            )
    return _answer("q3", verdict, f"{sign[0].upper()}{sign[1:]}; {phase}.", ["asymmetry", "phase_map"])


def q4(d: dict) -> dict:
    tails = [b for b in d["q4_regimes"]["betas"] if b["bucket"] == "tail"]
    if not tails or not any(b["beta_hard"]["fittable"] for b in tails) and not _contrasts(d, "hard_rank", "tail"):
        return _answer(
            "q4",
            NOT_MEASURED,
            "No per-regime telemetry (buckets off) or no TAIL fit: turn telemetry buckets on.",
            ["regimes"],
        )
    low = _low_nd_width(d, ("head", "mid", "tail"))
    W, S = len(d["sweep"]["widths"]), _seeds(d)
    loss_note = (
        ""
        if any(r.get("final_val_loss_tail") is not None for r in d["training"]["final"])
        else "; per-bucket validation loss not measured (no run logged val_loss_head/mid/tail)"
    )
    by_bucket = {b: _contrasts(d, "hard_rank", b) for b in ("tail", "head")}
    if by_bucket["tail"]:
        from capscale.analysis.power import holm

        rows = by_bucket["tail"] + by_bucket["head"]
        adj = holm([math.nan if r.get("p") is None else r["p"] for r in rows])
        alpha = 1 - d["parameters"]["confidence"]
        family = sum(1 for r in rows if _ok(r.get("p")))
        parts = [f"Within cells, Holm-corrected over {family} comparison(s) of β_hard on TAIL and HEAD tokens"]
        hits_any = False
        for bucket, sub in (("TAIL", rows[: len(by_bucket["tail"])]), ("HEAD", rows[len(by_bucket["tail"]) :])):
            sub_adj = adj[: len(sub)] if bucket == "TAIL" else adj[len(by_bucket["tail"]) :]
            hits = [r for r, p in zip(sub, sub_adj) if _ok(p) and p < alpha]
            hits_any = hits_any or bool(hits)
            if hits:
                parts.append(
                    f"on {bucket} tokens Δβ_hard differs in {len(hits)} of {len(sub)}: "
                    + "; ".join(
                        f"{r['cell']}: {r['b']} − {r['a']} {f2(r['diff'])} {iv(r['low'], r['high'])}" for r in hits
                    )
                )
            elif sub:
                parts.append(
                    f"on {bucket} tokens no Δβ_hard difference survives it ({_span([r['diff'] for r in sub])})"
                )
            pooled = _pooled_clause(d, "hard_rank", f"{bucket} Δβ_hard", bucket.lower())
            if pooled:
                parts.append(pooled)
        parts.append("TAIL " + power_clause(by_bucket["tail"]))
        return _answer(
            "q4", RESOLVED if hits_any else NOT_RESOLVED, "; ".join(parts) + loss_note + ".", ["regimes", "bucket_loss"]
        )
    # one series (or no per-bucket levels): TAIL against HEAD β_hard within a series
    conf = d["parameters"]["confidence"]
    rows = {(b["series"], b["bucket"]): b for b in d["q4_regimes"]["betas"] if b["beta_hard"]["fittable"]}
    for (series, bucket), t in sorted(rows.items()):
        if bucket != "tail" or (series, "head") not in rows:
            continue
        diff, dlo, dhi = beta_difference(_beta(t), _beta(rows[(series, "head")]), conf)
        text = f"{series}: TAIL β_hard − HEAD β_hard = {f2(diff)} {iv(dlo, dhi)}"
        if excludes(dlo, dhi, 0):
            return _answer("q4", RESOLVED, text + ".", ["regimes"])
        return _answer(
            "q4", NOT_RESOLVED, f"{text}, not resolved; {needed(diff, dlo, dhi, W, S, low_nd_width=low)}.", ["regimes"]
        )
    return _answer("q4", NOT_MEASURED, "No series has both a HEAD and a TAIL fit.", ["regimes"])


def answers(d: dict) -> list[dict]:
    """The answers of questions 1–4, in order (question 5's is in ``sections.q5_optimizer_architecture``)."""
    return [q1(d), q2(d), q3(d), q4(d)]
