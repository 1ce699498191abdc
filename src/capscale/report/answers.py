"""One plain verdict per question, computed from ``report.json``'s dict (``answers``).

Each answer: ``question``, ``verdict`` (``resolved`` / ``not resolved`` / ``not measured``),
a one-sentence ``finding`` and the ``figures`` behind it. The rule is the same for every
comparison of two numbers: a difference is *resolved* only when its interval, at the
report's confidence, excludes no difference (0 for a difference of β, 1 for a ratio of
ranks). A sentence never ranks two numbers whose intervals do not settle the order;
instead it says what sample would (``needed``).
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


def _widest_difference(rows: list[dict], conf: float, kind: str = "hard"):
    """The pair of series (same architecture) with the largest |Δ| in β_kind, and its interval."""
    best = None
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            if a["arch"] != b["arch"]:
                continue
            hi, lo = (a, b) if a[f"beta_{kind}"]["beta"] >= b[f"beta_{kind}"]["beta"] else (b, a)
            diff, dlo, dhi = beta_difference(_beta(hi, kind), _beta(lo, kind), conf)
            if best is None or diff > best[2]:
                best = (hi, lo, diff, dlo, dhi)
    return best


def _seeds(d: dict) -> int:
    runs = d["runs"]
    counts: dict = {}
    for r in runs:
        counts[(r["series"], r["width"])] = counts.get((r["series"], r["width"]), 0) + 1
    return min(counts.values()) if counts else 0


def _low_nd_width(d: dict, buckets=("all",)) -> int | None:
    widths = [r["width"] for r in d["reliability"]["low_nd"] if r["bucket"] in buckets]
    return max(widths) if widths else None


def headline_level(d: dict, bucket: str = "all", metric: str = "hard_rank") -> dict | None:
    """The level comparison the report leads with: the largest resolved ratio, else the largest."""
    rows = [r for r in d["levels"] if r["bucket"] == bucket and r["metric"] == metric]
    if not rows:
        return None
    resolved = [r for r in rows if r["resolved"]]
    return max(resolved or rows, key=lambda r: r["ratio"])


def level_sentence(r: dict, rank: str = "hard rank") -> str:
    """'muon realises 2.41× [2.10, 2.77] adamw's hard rank at every width (…), at 0.30 nats lower loss [..]'."""
    span = f"{r['n_widths']} widths, ≥ {r['n_seeds']} seed(s) each"
    where = (
        "at every width" if r["every_width"] else f"on average (per width {f2(r['ratio_min'])}–{f2(r['ratio_max'])}×)"
    )
    s = (
        f"{r['series']} realises {f2(r['ratio'])}× {iv(r['ratio_low'], r['ratio_high'])} {r['baseline']}'s {rank} "
        f"{where} (geometric mean over {span})"
    )
    if excludes(r["loss_diff_low"], r["loss_diff_high"], 0):
        side = "lower" if r["loss_diff"] < 0 else "higher"
        s += f", at {f2(abs(r['loss_diff']))} nats {side} loss {iv(r['loss_diff_low'], r['loss_diff_high'])}"
    elif _ok(r["loss_diff"]):
        s += f", at a final loss not distinguishable from it (difference {iv(r['loss_diff_low'], r['loss_diff_high'])} nats)"
    return s


def _answer(key: str, verdict: str, finding: str, figures: list[str]) -> dict:
    return {"id": key, "question": QUESTIONS[key], "verdict": verdict, "finding": finding, "figures": figures}


def q1(d: dict) -> dict:
    conf = d["parameters"]["confidence"]
    fits = _fittable(d["q1_scaling"]["fits"])
    level = headline_level(d)
    W, S = len(d["sweep"]["widths"]), _seeds(d)
    if not fits and level is None:
        return _answer("q1", NOT_MEASURED, "No series has ranks at 3 or more widths, so no β can be fitted.", [])
    parts, verdict = [], NOT_RESOLVED
    if level is not None:
        parts.append(level_sentence(level))
        if level["resolved"]:
            verdict = RESOLVED
        else:
            lo, hi = math.log(level["ratio_low"] or math.nan), math.log(level["ratio_high"] or math.nan)
            parts[-1] += " — not distinguishable from 1×: " + needed(
                math.log(level["ratio"]), lo, hi, W, S, "widths × seeds", _low_nd_width(d)
            )
    pair = _widest_difference(fits, conf)
    if pair is not None:
        hi, lo, diff, dlo, dhi = pair
        growth = (
            f"β_hard {hi['series']} {f2(hi['beta_hard']['beta'])} vs {lo['series']} {f2(lo['beta_hard']['beta'])}: "
            f"difference {f2(diff)} {iv(dlo, dhi)}"
        )
        if excludes(dlo, dhi, 0):
            verdict = RESOLVED
            parts.append(f"its growth with width differs too ({growth})")
        else:
            parts.append(
                f"whether it grows faster with width is not resolved ({growth}; {needed(diff, dlo, dhi, W, S)})"
            )
    elif fits:
        b = fits[0]["beta_hard"]
        grows = excludes(b["ci_low"], b["ci_high"], 0)
        verdict = RESOLVED if grows else verdict
        parts.append(
            f"{fits[0]['series']}: β_hard {f2(b['beta'])} {iv(b['ci_low'], b['ci_high'])}, "
            + ("rank grows with width" if grows else "growth with width not resolved")
        )
    return _answer("q1", verdict, "; ".join(parts) + ".", ["scaling", "levels"])


def q2(d: dict) -> dict:
    q = d["q2_matched_loss"]
    pairs = q["pairs"]
    if not pairs:
        return _answer(
            "q2",
            NOT_MEASURED,
            f"No two series reach the same final validation loss within {q['tolerance']:g} nats at a common width, "
            "so equal-loss geometry cannot be compared; a matched arm is needed (e.g. the slower optimizer "
            "trained for more steps, as the cpu preset's AdamW 2×-steps arm).",
            ["matched_loss"],
        )
    diff = [p for p in pairs if p["geometry"] == "different"]
    known = [p for p in pairs if p["geometry"] != "unknown"]
    if diff:
        p = diff[0]
        return _answer(
            "q2",
            RESOLVED,
            f"Same loss, different representation in {len(diff)} of {len(pairs)} matched pair(s): e.g. at width "
            f"{p['width']}, where {p['series_b']} and {p['series_a']} end {f2(abs(p['loss_diff']))} nats apart, "
            + _pair_difference(p)
            + ".",
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
        f"In none of the {len(pairs)} matched pair(s) does a β difference exclude 0 or a rank ratio exclude 1×, so "
        f"these data cannot tell the representations apart (e.g. width {p['width']}: {_pair_difference(p)}); "
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
        listed = ", ".join(
            f"{b['series']} {f2(b['beta_delta']['beta'])} {iv(b['beta_delta']['ci_low'], b['beta_delta']['ci_high'])}"
            for b in fits
            if b not in positive and b not in negative
        )
        parts.append(f"Δβ is not distinguishable from 0 for {undecided} of {len(fits)} series ({listed})")
    sign = "; ".join(parts)
    pair = _widest_difference(fits, conf, "delta")
    verdict = RESOLVED if settled else NOT_RESOLVED
    if pair is not None:
        hi, lo, diff, dlo, dhi = pair
        between = f"Δβ {hi['series']} {f2(hi['beta_delta']['beta'])} vs {lo['series']} {f2(lo['beta_delta']['beta'])}"
        if excludes(dlo, dhi, 0):
            verdict = RESOLVED
            sign += f"; the series differ ({between}: difference {f2(diff)} {iv(dlo, dhi)})"
        else:
            sign += (
                f"; whether the series differ is not resolved ({between}: difference {f2(diff)} {iv(dlo, dhi)}; "
                + needed(diff, dlo, dhi, len(d["sweep"]["widths"]), _seeds(d))
                + ")"
            )
    return _answer("q3", verdict, f"{sign[0].upper()}{sign[1:]}; {phase}.", ["asymmetry", "phase_map"])


def q4(d: dict) -> dict:
    tails = [b for b in d["q4_regimes"]["betas"] if b["bucket"] == "tail"]
    level = {b: headline_level(d, b) for b in ("head", "tail")}
    if not tails or not any(b["beta_hard"]["fittable"] for b in tails) and level["tail"] is None:
        return _answer(
            "q4",
            NOT_MEASURED,
            "No per-regime telemetry (buckets off) or no TAIL fit: turn telemetry buckets on.",
            ["regimes"],
        )
    low = _low_nd_width(d, ("head", "mid", "tail"))
    W, S = len(d["sweep"]["widths"]), _seeds(d)
    head, tail = level["head"], level["tail"]
    if (
        head is not None
        and tail is not None
        and (head["series"], head["baseline"]) == (tail["series"], tail["baseline"])
    ):
        a, b = tail["series"], tail["baseline"]
        text = (
            f"{a} over {b} in hard rank: {f2(tail['ratio'])}× {iv(tail['ratio_low'], tail['ratio_high'])} on TAIL "
            f"tokens, {f2(head['ratio'])}× {iv(head['ratio_low'], head['ratio_high'])} on HEAD tokens"
        )
        disjoint = _ok(tail["ratio_low"], head["ratio_high"], head["ratio_low"], tail["ratio_high"]) and (
            tail["ratio_low"] > head["ratio_high"] or head["ratio_low"] > tail["ratio_high"]
        )
        if disjoint:
            where = "TAIL" if tail["ratio"] > head["ratio"] else "HEAD"
            return _answer(
                "q4", RESOLVED, f"{text}: the difference is larger on {where} tokens (intervals disjoint).", ["regimes"]
            )
        # the log of the ratio of ratios, with the two half-widths added in quadrature
        diff = math.log(tail["ratio"] / head["ratio"])
        half = (
            math.hypot(*(math.log(r["ratio_high"] / r["ratio_low"]) / 2 for r in (tail, head)))
            if _ok(tail["ratio_low"], head["ratio_low"])
            else math.nan
        )
        return _answer(
            "q4",
            NOT_RESOLVED,
            f"{text}: the intervals overlap, so where the difference forms is not resolved; "
            + needed(diff, diff - half, diff + half, W, S, "widths × seeds", low)
            + ".",
            ["regimes", "bucket_loss"],
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


def q5(d: dict) -> dict:
    q = d["q5_optimizer_architecture"]
    if not q["arch_axes"]:
        return _answer(
            "q5",
            NOT_MEASURED,
            "No architecture axis varied in this sweep, so only optimizer effects are measured; a sweep with an "
            "arch axis (e.g. the cpu preset's no-position arm) is needed to compare.",
            ["optimizer_architecture"],
        )
    s = {r["metric"]: r for r in q["summary"]}.get("hard")
    if not s or s.get("optimizer_span") is None or s.get("architecture_span") is None:
        return _answer(
            "q5",
            NOT_RESOLVED,
            "Too few settings or architectures share 3 widths to compare their effects on β_hard.",
            ["optimizer_architecture"],
        )
    text = (
        f"Span of β_hard across optimizers {f2(s['optimizer_span'])} (intervals within "
        f"{iv(s['optimizer_low'], s['optimizer_high'])}), across architectures {f2(s['architecture_span'])} "
        f"(within {iv(s['architecture_low'], s['architecture_high'])})"
    )
    if s["larger"]:
        return _answer("q5", RESOLVED, f"{text}: the {s['larger']} effect is larger.", ["optimizer_architecture"])
    return _answer(
        "q5",
        NOT_RESOLVED,
        f"{text}: the intervals overlap, so which effect is larger is not resolved (the point estimates favour the "
        f"{s['point_larger']}); more seeds per width on both axes would be needed.",
        ["optimizer_architecture"],
    )


def answers(d: dict) -> list[dict]:
    """The five answers, in question order."""
    return [q1(d), q2(d), q3(d), q4(d), q5(d)]
