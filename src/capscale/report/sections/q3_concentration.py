"""Question 3 — is capacity broad or concentrated in a few directions? (``report.json`` key
``q3_asymmetry``; figures ``asymmetry`` and ``phase_map``).

Δβ = β_soft − β_hard per series (> 0: the spectrum grows more unequal with width), the
optimizers' Δβ compared within cells (Holm), and each run's place on the phase map.
"""

from __future__ import annotations

import math

from capscale.analysis import REGIONS, Analysis
from capscale.report.betas import beta_rows
from capscale.report.format import Section, beta, beta_flag, beta_notes, boot, get, num, table
from capscale.report.records import jsonable, records
from capscale.report.verdicts import (
    NOT_MEASURED,
    NOT_RESOLVED,
    RESOLVED,
    answer_for,
    contrasts,
    excludes,
    f2,
    fittable,
    iv,
    ok,
    power_clause,
    span,
)

KEY = "q3_asymmetry"
FIGURES = ("asymmetry", "phase_map")


def data(a: Analysis) -> dict:
    return jsonable(
        {
            "delta_beta": beta_rows(a, a.params.site, "all"),
            "phase": records(a.phase),
            "region_counts": records(a.phase.groupby(["series", "region"]).size().rename("n_runs").reset_index()),
            "thresholds": a.params.phase.to_dict(),
        }
    )


# -- the verdict ----------------------------------------------------------------------


def answer(d: dict) -> dict:
    conf = d["parameters"]["confidence"]
    fits = fittable(d[KEY]["delta_beta"], "delta")
    counts: dict[str, int] = {}
    for r in d[KEY]["region_counts"]:
        counts[r["region"]] = counts.get(r["region"], 0) + r["n_runs"]
    phase = "phase map: " + ", ".join(f"{n} run(s) {reg}" for reg, n in sorted(counts.items()))
    if not fits:
        return answer_for("q3", NOT_MEASURED, f"No Δβ is fittable (needs ≥ 3 widths); {phase}.", ["phase_map"])
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
        bounds = [(b["beta_delta"]["ci_low"], b["beta_delta"]["ci_high"]) for b in open_]
        far = span([max(abs(lo), abs(hi)) for lo, hi in bounds if ok(lo, hi)])
        parts.append(
            f"for {undecided} of {len(fits)} series the interval of Δβ holds 0, so neither sign is resolved "
            f"({listed}); their data exclude |Δβ| beyond {far}"
        )
    sign = "; ".join(parts)
    verdict = RESOLVED if settled else NOT_RESOLVED
    deltas = contrasts(d, "delta_beta")
    if deltas:
        alpha = 1 - conf
        hits = [r for r in deltas if ok(r.get("holm_p")) and r["holm_p"] < alpha]
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
                f"{deltas[0]['family_size']} (differences {span([r['diff'] for r in deltas])}; "
                + power_clause(deltas, "Δβ difference")
                + ")"
            )
    return answer_for("q3", verdict, f"{sign[0].upper()}{sign[1:]}; {phase}.", ["asymmetry", "phase_map"])


# -- the page -------------------------------------------------------------------------


def _delta(r: dict) -> str:
    return beta(r["beta_delta"])


def _delta_boot(r: dict) -> str:
    return boot(r["beta_delta"])


def _soft(r: dict) -> str:
    return num(r["beta_soft"]["beta"])


def _hard(r: dict) -> str:
    return num(r["beta_hard"]["beta"])


def _count(region: str):
    def cell(r: dict) -> str:
        return str(r.get(region, 0))

    return cell


def _odd_point(r: dict) -> bool:
    return r["region"] == "impossible" or r["worst_status"] != "well_sampled"


def section(d: dict) -> Section:
    q = d[KEY]
    t = q["thresholds"]
    counts: dict[str, dict[str, int]] = {}
    for r in q["region_counts"]:
        counts.setdefault(r["series"], {})[r["region"]] = r["n_runs"]
    regions = [*REGIONS, "unknown"]
    count_rows = [{"series": s, **c} for s, c in sorted(counts.items())]
    delta = [b for b in d["betas"] if b["bucket"] == "all"]
    return Section(
        "q3",
        "3. How is capacity structured? Asymmetry Δβ and the phase map",
        [
            (
                "Δβ = β_soft − β_hard: how much faster the count of used directions grows than the count of directions "
                "sharing the energy. Δβ > 0 means the spectrum grows more unequal with width ({fig:asymmetry})."
            ),
            (
                f"Phase regions (r1 = R1/D, r2 = R2/D; thresholds are parameters — the paper gives none): impossible if "
                f"r2 > r1; collapsed if r1 < {t['collapsed_soft']:g}; brittle if r2/r1 < {t['brittle_ratio']:g} "
                f"(asymmetry log(R1/R2) > {math.log(1 / t['brittle_ratio']):.2f}); broad if r1 ≥ {t['broad_soft']:g}; "
                "compact otherwise. Each run's final aggregated ranks, bucket all ({fig:phase_map})."
            ),
        ],
        list(FIGURES),
        [
            table(
                "Δβ per series and site, all tokens.",
                [
                    ("series", get("series")),
                    ("site", get("site")),
                    ("Δβ [95% CI]", _delta),
                    ("Δβ bootstrap", _delta_boot),
                    ("β_soft", _soft),
                    ("β_hard", _hard),
                    ("notes", beta_notes),
                ],
                delta,
                beta_flag,
            ),
            table(
                "Runs per phase region.",
                [("series", get("series"))] + [(reg, _count(reg)) for reg in regions],
                count_rows,
            ),
            table(
                "Phase map points (one per run).",
                [
                    ("run", get("name")),
                    ("series", get("series")),
                    ("width", get("width")),
                    ("seed", get("seed")),
                    ("R1/D", get("soft_frac")),
                    ("R2/D", get("hard_frac")),
                    ("R2/R1", get("balance")),
                    ("region", get("region")),
                    ("sampling", get("worst_status")),
                ],
                q["phase"],
                _odd_point,
                collapsed=True,
            ),
        ],
    )
