"""Question 2 — at the same loss, is the representation the same? (``report.json`` key
``q2_matched_loss``; figure ``matched_loss``).

Pairs of series whose final validation loss (median over seeds) agrees within the tolerance at a
common width; a pair differs when a rank ratio or β difference survives Holm over all pairs ×
{R1, R2, β_soft, β_hard}.
"""

from __future__ import annotations

import math

from capscale.analysis import ALL_BUCKETS, Analysis
from capscale.report.format import Section, get, interval, num, table
from capscale.report.records import jsonable, records
from capscale.report.verdicts import NOT_MEASURED, NOT_RESOLVED, RESOLVED, answer_for, f2, iv, min_seeds, needed, ok

KEY = "q2_matched_loss"
FIGURES = ("matched_loss",)


def data(a: Analysis) -> dict:
    return jsonable({"tolerance": a.params.tolerance, "pairs": records(a.matched), "loss_by_width": records(a.losses)})


# -- the verdict ----------------------------------------------------------------------


def answer(d: dict) -> dict:
    q = d[KEY]
    pairs = q["pairs"]
    if not any(r.get("final_val_loss") is not None for r in d["training"]["final"]):
        return answer_for(
            "q2",
            NOT_MEASURED,
            "Validation loss not measured: no run logged one (a training loop's callback reads it by the key given "
            "as val_loss_key=), so runs cannot be matched by loss.",
            list(FIGURES),
        )
    if not pairs:
        return answer_for(
            "q2",
            NOT_MEASURED,
            f"No two series reach the same final validation loss within {q['tolerance']:g} nats at a common width, "
            "so equal-loss geometry cannot be compared; a matched arm is needed (e.g. the slower optimizer "
            "trained for more steps, as the cpu preset's AdamW 2×-steps arm).",
            list(FIGURES),
        )
    known = [p for p in pairs if p["geometry"] != "unknown"]
    hits = _q2_hits(pairs, 1 - d["parameters"]["confidence"])
    if hits:
        p, what = hits[0]
        a, b, where = _names(p)
        n_pairs = len({id(x) for x, _ in hits})
        return answer_for(
            "q2",
            RESOLVED,
            f"Same loss, different representation in {n_pairs} of {len(pairs)} matched pair(s), Holm-corrected over "
            f"the {4 * len(pairs)} comparisons (rank ratios R1, R2 and β_soft, β_hard differences of every pair): e.g. "
            f"at width {p['width']}{where}, where {b} and {a} end "
            f"{f2(abs(p['loss_diff']))} nats apart, {what}.",
            list(FIGURES),
        )
    if not known:
        return answer_for(
            "q2",
            NOT_RESOLVED,
            f"{len(pairs)} matched pair(s), but neither β (≥ 3 widths per series) nor a rank ratio at the matched "
            "width (≥ 2 seeds per series) can be judged for any of them.",
            list(FIGURES),
        )
    p = known[0]
    return answer_for(
        "q2",
        NOT_RESOLVED,
        f"In none of the {len(pairs)} matched pair(s) does a rank ratio or β difference survive a Holm correction "
        f"over the {4 * len(pairs)} comparisons, so these data cannot tell the representations apart "
        f"(e.g. width {p['width']}{_names(p)[2]}: {_pair_difference(p)}); "
        + needed(
            math.log(p["hard_ratio"]) if ok(p.get("hard_ratio")) else p["hard_diff"],
            math.log(p["hard_ratio_low"]) if ok(p.get("hard_ratio_low")) else p["hard_diff_low"],
            math.log(p["hard_ratio_high"]) if ok(p.get("hard_ratio_high")) else p["hard_diff_high"],
            len(d["sweep"]["widths"]),
            min_seeds(d),
        )
        + ".",
        list(FIGURES),
    )


SEP = " · "  # how series names join their factor labels


def _names(p: dict) -> tuple[str, str, str]:
    """(a, b, where): the pair's series names without the labels they share, and those shared
    labels (" in d_model=96 · 780 steps", or ""), so an answer names the shared part once."""
    a, b = p["series_a"].split(SEP), p["series_b"].split(SEP)
    common = [x for x in a if x in b]
    ra, rb = [x for x in a if x not in common], [x for x in b if x not in common]
    if not common or not ra or not rb:
        return p["series_a"], p["series_b"], ""
    return SEP.join(ra), SEP.join(rb), f" in {SEP.join(common)}"


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
            if ok(est, lo, hi) and min(est, lo, hi) > 0:
                se = (math.log(hi) - math.log(lo)) / (2 * z)
                pv = 2 * stats.norm.sf(abs(math.log(est)) / se) if se > 0 else math.nan
                a, b, _ = _names(p)
                text = f"{b}'s {rank} is {f2(est)}× {iv(lo, hi)} {a}'s"
            else:
                pv, text = math.nan, ""
            rows.append((p, pv, text))
            est, lo, hi = (p.get(f"{kind}_diff{e}") for e in ("", "_low", "_high"))
            if ok(est, lo, hi):
                se = (hi - lo) / (2 * z)
                pv = 2 * stats.norm.sf(abs(est) / se) if se > 0 else math.nan
                a, b, _ = _names(p)
                text = f"β_{kind} differs by {f2(est)} {iv(lo, hi)} ({b} − {a})"
            else:
                pv, text = math.nan, ""
            rows.append((p, pv, text))
    adj = holm([pv for _, pv, _ in rows])
    return [(p, text) for (p, _, text), q in zip(rows, adj) if ok(q) and q < alpha]


def _pair_difference(p: dict) -> str:
    """The matched pair's hard-rank ratio at its width and its β_hard difference, with intervals."""
    a, b, _ = _names(p)
    parts = []
    if ok(p.get("hard_ratio")):
        parts.append(
            f"{b}'s hard rank is {f2(p['hard_ratio'])}× {iv(p.get('hard_ratio_low'), p.get('hard_ratio_high'))} {a}'s"
        )
    if ok(p.get("hard_diff")):
        parts.append(f"β_hard differs by {f2(p['hard_diff'])} {iv(p['hard_diff_low'], p['hard_diff_high'])}")
    return " and ".join(parts) or "nothing can be compared"


# -- the page -------------------------------------------------------------------------


def _pair_beta(row: dict, kind: str, side: str) -> str:
    b = row.get(f"beta_{kind}_{side}")
    return f"{num(b)} {interval(row.get(f'beta_{kind}_low_{side}'), row.get(f'beta_{kind}_high_{side}'))}"


def _hard_ratio(r: dict) -> str:
    return f"{num(r.get('hard_ratio'), 2)}× {interval(r.get('hard_ratio_low'), r.get('hard_ratio_high'), 2)}"


def _diff(kind: str):
    def cell(r: dict) -> str:
        return f"{num(r.get(f'{kind}_diff'))} {interval(r.get(f'{kind}_diff_low'), r.get(f'{kind}_diff_high'))}"

    return cell


def _side_beta(side: str):
    def cell(r: dict) -> str:
        return _pair_beta(r, "hard", side)

    return cell


def _a_b(key: str):
    """'value of A / value of B' for a column measured on both series of a pair."""

    def cell(r: dict) -> str:
        return f"{num(r.get(f'{key}_a'))} / {num(r.get(f'{key}_b'))}"

    return cell


def _different(r: dict) -> bool:
    return r["geometry"] == "different"


def section(d: dict) -> Section:
    q = d[KEY]
    cols = [
        ("geometry", get("geometry")),
        ("width", get("width")),
        ("series A", get("series_a")),
        ("series B", get("series_b")),
        ("loss B − A", get("loss_diff", 4)),
        ("R2 B / A [CI]", _hard_ratio),
        ("β_hard B − A [CI]", _diff("hard")),
        ("β_soft B − A [CI]", _diff("soft")),
        ("val loss A", get("val_loss_a", 4)),
        ("val loss B", get("val_loss_b", 4)),
        ("β_hard A", _side_beta("a")),
        ("β_hard B", _side_beta("b")),
        ("Δβ A / B", _a_b("beta_delta")),
        *[(f"R2/D {bucket.upper()} A / B", _a_b(f"hard_frac_{bucket}")) for bucket in ALL_BUCKETS],
        ("log(R1/R2) A / B", _a_b("asymmetry")),
    ]
    losses = [
        ("series", get("series")),
        ("width", get("width")),
        ("val loss", get("val_loss", 4)),
        ("min", get("val_loss_min", 4)),
        ("max", get("val_loss_max", 4)),
        ("seeds", get("n_seeds")),
    ]
    return Section(
        "q2",
        "2. Same loss, same geometry? Matched-loss pairs",
        [
            (
                f"Pairs of series (different optimizer or step budget, same architecture) whose final validation loss, "
                f"median over seeds, agrees within {q['tolerance']:g} nats at a common width ({{fig:matched_loss}}). "
                "'different': at that width the rank ratio's interval (over seeds) excludes 1×, or the interval of "
                "the β_soft or β_hard difference excludes 0 — equal loss, different spectral geometry; "
                "'indistinguishable': every interval includes no difference, so these data cannot tell the two "
                "geometries apart (which is not the same as showing them equal)."
            ),
        ],
        list(FIGURES),
        [
            table(
                "Matched-loss pairs.",
                cols,
                q["pairs"],
                _different,
                empty="no pair of series agrees within the tolerance at a common width",
                pinned=1,
            ),
            table("Final validation loss per series and width.", losses, q["loss_by_width"], collapsed=True),
        ],
    )
