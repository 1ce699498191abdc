"""Question 4 — where in the data (HEAD / MID / TAIL tokens) does capacity form? (``report.json``
key ``q4_regimes``; figures ``regimes`` and ``bucket_loss``).

β per token-frequency regime; the optimizers' β_hard on TAIL and HEAD tokens compared within
cells (Holm over both), or, with one optimizer, TAIL against HEAD within a series.
"""

from __future__ import annotations

import math

from capscale.analysis import Analysis, beta_difference
from capscale.analysis.aggregate import REPORT_COLUMNS
from capscale.report.betas import beta_rows
from capscale.report.format import Section, beta_columns, beta_flag, get, table
from capscale.report.records import jsonable, records
from capscale.report.verdicts import (
    NOT_MEASURED,
    NOT_RESOLVED,
    RESOLVED,
    answer_for,
    beta_tuple,
    contrasts,
    excludes,
    f2,
    iv,
    low_nd_width,
    min_seeds,
    needed,
    ok,
    pooled_clause,
    power_clause,
    span,
)
from capscale.spectrum.summary import REPORT_METRICS

KEY = "q4_regimes"
FIGURES = ("regimes", "bucket_loss")


def data(a: Analysis) -> dict:
    # per series × width × bucket: seed-median final val loss and capacity (R1/D, R2/D)
    cols = ["val_loss", *REPORT_COLUMNS]
    capacity = a.buckets.groupby(["series", "width", "bucket"])[cols].median().reset_index()
    return jsonable({"betas": beta_rows(a, a.params.site), "bucket_capacity": records(capacity)})


# -- the verdict ----------------------------------------------------------------------


def answer(d: dict) -> dict:
    tails = [b for b in d[KEY]["betas"] if b["bucket"] == "tail"]
    if not tails or not any(b["beta_hard"]["fittable"] for b in tails) and not contrasts(d, "hard_rank", "tail"):
        return answer_for(
            "q4",
            NOT_MEASURED,
            "No per-regime telemetry (buckets off) or no TAIL fit: turn telemetry buckets on.",
            ["regimes"],
        )
    low = low_nd_width(d, ("head", "mid", "tail"))
    W, S = len(d["sweep"]["widths"]), min_seeds(d)
    loss_note = (
        ""
        if any(r.get("final_val_loss_tail") is not None for r in d["training"]["final"])
        else "; per-bucket validation loss not measured (no run logged val_loss_head/mid/tail)"
    )
    by_bucket = {b: contrasts(d, "hard_rank", b) for b in ("tail", "head")}
    if by_bucket["tail"]:
        from capscale.analysis.power import holm

        rows = by_bucket["tail"] + by_bucket["head"]
        adj = holm([math.nan if r.get("p") is None else r["p"] for r in rows])
        alpha = 1 - d["parameters"]["confidence"]
        family = sum(1 for r in rows if ok(r.get("p")))
        parts = [f"Within cells, Holm-corrected over {family} comparison(s) of β_hard on TAIL and HEAD tokens"]
        hits_any = False
        for bucket, sub in (("TAIL", rows[: len(by_bucket["tail"])]), ("HEAD", rows[len(by_bucket["tail"]) :])):
            sub_adj = adj[: len(sub)] if bucket == "TAIL" else adj[len(by_bucket["tail"]) :]
            hits = [r for r, p in zip(sub, sub_adj) if ok(p) and p < alpha]
            hits_any = hits_any or bool(hits)
            if hits:
                parts.append(
                    f"on {bucket} tokens Δβ_hard differs in {len(hits)} of {len(sub)}: "
                    + "; ".join(
                        f"{r['cell']}: {r['b']} − {r['a']} {f2(r['diff'])} {iv(r['low'], r['high'])}" for r in hits
                    )
                )
            elif sub:
                parts.append(f"on {bucket} tokens no Δβ_hard difference survives it ({span([r['diff'] for r in sub])})")
            pooled = pooled_clause(d, "hard_rank", f"{bucket} Δβ_hard", bucket.lower())
            if pooled:
                parts.append(pooled)
        parts.append("TAIL " + power_clause(by_bucket["tail"]))
        return answer_for(
            "q4", RESOLVED if hits_any else NOT_RESOLVED, "; ".join(parts) + loss_note + ".", ["regimes", "bucket_loss"]
        )
    # one series (or no per-bucket levels): TAIL against HEAD β_hard within a series
    conf = d["parameters"]["confidence"]
    rows = {(b["series"], b["bucket"]): b for b in d[KEY]["betas"] if b["beta_hard"]["fittable"]}
    for (series, bucket), t in sorted(rows.items()):
        if bucket != "tail" or (series, "head") not in rows:
            continue
        diff, dlo, dhi = beta_difference(beta_tuple(t), beta_tuple(rows[(series, "head")]), conf)
        text = f"{series}: TAIL β_hard − HEAD β_hard = {f2(diff)} {iv(dlo, dhi)}"
        if excludes(dlo, dhi, 0):
            return answer_for("q4", RESOLVED, text + ".", ["regimes"])
        return answer_for(
            "q4", NOT_RESOLVED, f"{text}, not resolved; {needed(diff, dlo, dhi, W, S, low_nd_width=low)}.", ["regimes"]
        )
    return answer_for("q4", NOT_MEASURED, "No series has both a HEAD and a TAIL fit.", ["regimes"])


# -- the page -------------------------------------------------------------------------


def _tokens(r: dict) -> str:
    return r["bucket"].upper()


def section(d: dict) -> Section:
    q = d[KEY]
    cap = [
        ("series", get("series")),
        ("width", get("width")),
        ("tokens", _tokens),
        ("final val loss", get("val_loss", 4)),
        *[(m.label, get(m.name, 1)) for m in REPORT_METRICS],
        *[(f"{m.label}/D", get(m.frac)) for m in REPORT_METRICS if m.frac],
    ]
    return Section(
        "q4",
        "4. Where does capacity form? β by token regime",
        [
            (
                "HEAD / MID / TAIL: token types by corpus frequency (the leading third of occurrences, the next third, "
                "the rest); a row is bucketed by its input token. Rare-token (TAIL) representations are where learning is "
                "hardest; the paper reports AdamW β_hard ≈ 0.44 there against ≈ 1.02 for Muon (GPT-2 160M)."
            ),
            "{fig:regimes} gives β per regime; {fig:bucket_loss} shows per-bucket validation loss beside the "
            "per-bucket capacity of the same runs.",
        ],
        list(FIGURES),
        [
            table("β by token regime.", beta_columns(True, False), q["betas"], beta_flag),
            table(
                "Per-bucket final validation loss and capacity (median over seeds).",
                cap,
                q["bucket_capacity"],
                collapsed=True,
            ),
        ],
    )
