"""The capacity-aware scaling law (``report.json`` key ``law``), shown when the design varies more than width.

Each capacity variable (soft and hard rank, log(R1/R2), TAIL hard rank) as one joint power law
in FFN width, d_model or depth, and tokens, per optimizer label with the label × factor
interactions, intervals clustered by seed (``capscale.analysis.law``, as ``capscale law``); the
loss law on the same runs beside it; each design cell left out and predicted, against the spread
between its seeds; and the law at the paper's 160M shape, marked as an extrapolation. A sweep
that varies FFN width alone has nothing for a joint law to fit: the key then holds
``{"shown": false, "why": ...}`` and the page has no section.
"""

from __future__ import annotations

from capscale.analysis import Analysis
from capscale.analysis.law import CAPACITY_VARIABLES, PAPER_160M, capacity_law, law_table, varying_factors
from capscale.report.format import Section, get, interval, num, table
from capscale.report.records import jsonable, records

KEY = "law"
_NAMES = {"soft_rank": "soft rank R1", "hard_rank": "hard rank R2", "asymmetry": "log(R1/R2)"}
_NAMES["tail_hard_rank"] = "TAIL hard rank R2"
_TERMS = {"intercept": "level c", "ffn": "β_ffn", "d_model": "β_d_model", "depth": "β_depth", "tokens": "β_tokens"}


def _hidden(why: str) -> dict:
    return {"shown": False, "why": why}


def data(a: Analysis) -> dict:
    p = a.params
    try:
        runs = law_table(a.sweep, p.last_k, p.site, p.final_fraction)
    except (KeyError, ValueError) as exc:
        return _hidden(f"the runs do not give the law's factors ({type(exc).__name__}: {exc})")
    factors = varying_factors(runs)
    if not set(factors) - {"ffn"}:
        return _hidden(
            "the design varies FFN width only (" + (", ".join(factors) or "no factor") + "): a joint law "
            "needs d_model, depth or tokens to vary as well"
        )
    try:
        law = capacity_law(a.sweep, p.last_k, p.site, "seed", p.confidence, final_fraction=p.final_fraction)
    except ValueError as exc:
        return _hidden(f"the joint law cannot be fitted: {exc}")
    first = next(iter(law.fits.values()))
    coef = []
    for name, fit in law.fits.items():
        coef += [r | {"variable": name, "kind": "label"} for r in records(fit.coef)]
        coef += [r | {"variable": name, "kind": "contrast"} for r in records(fit.contrasts)]
    cells = [r | {"variable": n} for n, c in law.held_out.items() for r in records(c)]
    paper = law.paper.assign(
        above_width=(law.paper["value"] > law.paper["ffn"]) & (law.paper["variable"] != "asymmetry")
    )
    return jsonable(
        {
            "shown": True,
            "site": p.site,
            "confidence": p.confidence,
            "n_runs": len(law.table),
            "factors": list(first.factors),
            **({"aliased": first.aliased} if first.aliased else {}),  # only where some factor is
            "fixed": law.fixed,
            "cluster": first.cluster,
            "n_clusters": first.n_clusters,
            "df": first.df,
            "method": (
                "per run: the report's aggregate (median of the last logged steps per layer, then over layers); "
                "log R = c_o + Σ_f β_o,f · log x_f by OLS over all runs, every coefficient separate per optimizer "
                "label o, log factors centred at their geometric means (asymmetry log(R1/R2) fitted as is); "
                "standard errors: the larger of the seed-clustered (CR1) and the classical, t with G − 1 df; "
                "held out: each cell (label × factor levels) left out, the law refitted on the rest, the cell's "
                "mean over seeds predicted; loss law: log L = c + α log N + γ log D (seed-clustered) and "
                "L = E + A N^−a + B D^−b (asymptotic intervals), N = non-embedding block parameters, D = tokens"
            ),
            "variables": [
                {
                    "variable": v.name,
                    "description": v.description,
                    "log": v.log,
                    "r2": law.fits[v.name].r2,
                    "n": law.fits[v.name].n,
                    "resid_sd": law.fits[v.name].resid_sd,
                }
                for v in CAPACITY_VARIABLES
                if v.name in law.fits
            ],
            "coef": coef,
            "held_out": records(law.held_out_summary),
            "held_out_cells": cells,
            "loss": records(law.loss),
            "extrapolation": {
                "target": {k: list(v) if isinstance(v, tuple) else v for k, v in PAPER_160M.items()},
                "max_factor": float(law.paper["extrapolation"].max()),
                "rows": records(paper),
            },
        }
    )


def _coef_rows(q: dict) -> list[dict]:
    """One row per variable × label (labels, then their differences), one cell per term."""
    out: dict[tuple, dict] = {}
    for r in q["coef"]:
        key = (r["variable"], r["kind"] == "contrast", r["label"])
        row = out.setdefault(key, {"variable": r["variable"], "label": r["label"]})
        row[r["term"]] = r
    order = [v["variable"] for v in q["variables"]]
    return sorted(out.values(), key=lambda r: (order.index(r["variable"]), " − " in r["label"], r["label"]))


def _cell(r: dict | None, digits: int = 2) -> str:
    return "—" if r is None else f"{num(r['estimate'], digits)} {interval(r['ci_low'], r['ci_high'], digits)}"


def _term_cell(term: str):
    return lambda row: _cell(row.get(term))


def _level_cell(factor: str):
    return lambda row: num(row.get(factor), 0)


def _excludes_zero(r: dict | None) -> bool:
    return r is not None and r["ci_low"] is not None and (r["ci_low"] > 0 or r["ci_high"] < 0)


def section(d: dict) -> Section | None:
    q = d.get(KEY)
    if not q or not q.get("shown"):
        return None
    conf = q["confidence"]
    r2 = {v["variable"]: v["r2"] for v in q["variables"]}
    terms = ["intercept", *q["factors"]]
    coef_rows = _coef_rows(q)
    coef = table(
        f"Exponents of the joint law, {q['site']}-activation, {conf:.0%} intervals clustered by seed "
        f"(G = {q['n_clusters']}, t with {q['df']} df). Rows 'b − a' are the label × factor interactions; "
        "highlighted: a difference whose interval excludes 0.",
        [
            ("variable", lambda r: _NAMES.get(r["variable"], r["variable"])),
            ("optimizer", get("label")),
            *[(_TERMS.get(t, t), _term_cell(t)) for t in terms],
            ("R²", lambda r: num(r2.get(r["variable"]), 2)),
        ],
        coef_rows,
        lambda r: " − " in r["label"] and any(_excludes_zero(r.get(t)) for t in q["factors"]),
        pinned=2,
    )
    held = table(
        "Held-out validation: each cell left out, the law refitted on the rest, the cell's mean predicted "
        "(errors in log rank, or in asymmetry units). Highlighted: held-out error above twice the spread "
        "between seeds — the law describes those runs but does not predict them to the noise.",
        [
            ("variable", lambda r: _NAMES.get(r["variable"], r["variable"])),
            ("optimizer", get("label")),
            ("cells", get("cells")),
            ("RMS held-out error", get("rms_error")),
            ("RMS spread between seeds", get("rms_seed_sd")),
            ("ratio", lambda r: num(r["ratio"], 2)),
            (
                "prediction inside the seeds' range",
                lambda r: "—" if r["within_seeds"] is None else f"{r['within_seeds']:.0%}",
            ),
        ],
        q["held_out"],
        lambda r: r["ratio"] is not None and r["ratio"] > 2,
        answer=5,
    )
    loss = table(
        "The loss law on the same runs: final validation loss against N (non-embedding block parameters) and "
        "D (tokens). Read the log-linear fit where the Chinchilla form is not identified.",
        [
            ("optimizer", get("label")),
            ("runs", get("n")),
            ("α (log N)", lambda r: f"{num(r['alpha_n'])} {interval(r['alpha_n_low'], r['alpha_n_high'])}"),
            ("γ (log D)", lambda r: f"{num(r['gamma_d'])} {interval(r['gamma_d_low'], r['gamma_d_high'])}"),
            ("Chinchilla a", lambda r: f"{num(r['a'])} {interval(r['a_low'], r['a_high'])}"),
            ("Chinchilla b", lambda r: f"{num(r['b'])} {interval(r['b_low'], r['b_high'])}"),
            ("E", lambda r: f"{num(r['E'])} {interval(r['E_low'], r['E_high'])}"),
            ("identified", lambda r: "yes" if r["identified"] else f"no: {r['why']}"),
        ],
        q["loss"],
        lambda r: not r["identified"],
    )
    ex = q["extrapolation"]
    names = [v["variable"] for v in q["variables"]]
    by_key: dict[tuple, dict] = {}
    for r in ex["rows"]:
        by_key.setdefault((r["label"], r["ffn"]), {"label": r["label"], "ffn": r["ffn"]})[r["variable"]] = r

    def _pred(name: str):
        digits = 2 if name == "asymmetry" else 0

        def cell(row: dict) -> str:
            r = row.get(name)
            if r is None:
                return "—"
            flag = " (above the width)" if r["above_width"] else ""
            return f"{num(r['value'], digits)} {interval(r['ci_low'], r['ci_high'], digits)}{flag}"

        return cell

    target = ex["target"]
    paper = table(
        f"EXTRAPOLATION to the paper's 160M shape (d_model {target['d_model']}, {target['depth']} layers, "
        f"{target['tokens']:.3g} tokens): up to {ex['max_factor']:.0f}× beyond the data's range. The interval is "
        "that of the law's coefficients only, not the error of its form; highlighted: a predicted rank above the "
        "FFN width, which no rank can be.",
        [
            ("optimizer", get("label")),
            ("FFN width", lambda r: str(int(r["ffn"]))),
            *[(_NAMES.get(n, n), _pred(n)) for n in names],
        ],
        sorted(by_key.values(), key=lambda r: (r["label"], r["ffn"])),
        lambda r: any(v["above_width"] for k, v in r.items() if isinstance(v, dict)),
        collapsed=True,
    )
    cells = table(
        "Held-out cells: observed mean over seeds, prediction with the cell left out, and the seeds' range.",
        [
            ("variable", lambda r: _NAMES.get(r["variable"], r["variable"])),
            ("optimizer", get("label")),
            *[(f, _level_cell(f)) for f in q["factors"]],
            ("seeds", get("n_seeds")),
            ("observed", get("observed")),
            ("predicted", get("predicted")),
            ("error", get("error")),
            ("seeds' range", lambda r: interval(r["seed_min"], r["seed_max"])),
        ],
        q["held_out_cells"],
        lambda r: not r["within_seeds"],
        collapsed=True,
        pinned=2,
    )
    fixed = ", ".join(f"{k} = {v:g}" for k, v in q["fixed"].items())
    text = [
        "Beyond the paper, which fits one width exponent per optimizer at a fixed model and token budget: every "
        f"capacity variable as one joint power law in {', '.join(q['factors'])} over all {q['n_runs']} runs, "
        "log R = c + Σ β_f · log x_f, with separate coefficients per optimizer (the 'b − a' rows are the "
        "optimizer × factor interactions, each with its own interval). Factors are centred at their geometric "
        "means, so the level c is the log rank at the design's centre. The asymmetry log(R1/R2) is fitted as is: "
        "its exponents are Δβ.",
        f"Intervals are clustered by seed (G = {q['n_clusters']}: a t with {q['df']} degrees of freedom), each "
        "standard error the larger of the cluster-robust and the classical one — few clusters make the robust one "
        "noisy and biased low.",
        "The law is validated as a prediction: each design cell is left out, the law refitted without it, and the "
        "cell predicted; an error of the order of the spread between the cell's seeds means the law predicts runs "
        "it has not seen.",
    ]
    if fixed:
        text.append(f"Held fixed in the data, so invisible to the law: {fixed}.")
    for f, partner in q.get("aliased", {}).items():
        text.append(
            f"{f} varies together with {partner} in this design, so the data cannot tell their effects apart: "
            f"{f} is left out of the fit and {partner}'s exponent carries both."
        )
    return Section(
        "law",
        "A capacity-aware scaling law: ranks as a joint power law in the design",
        text,
        [],
        [coef, held, loss, paper, cells],
    )
