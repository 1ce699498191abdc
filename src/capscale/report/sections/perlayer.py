"""Per layer: β and Δβ of each layer, the depth × optimizer interaction, lack of fit (``report.json`` key ``per_layer``)."""

from __future__ import annotations

from capscale.analysis import Analysis
from capscale.report.format import (
    Section,
    diff_ci,
    get,
    interval,
    no_interval,
    num,
    num_of,
    pair,
    rank_name,
    resolved,
    seeds_ab,
    table,
)
from capscale.report.records import jsonable, records

KEY = "per_layer"


def data(a: Analysis) -> dict:
    primary = a.contrasts
    if len(primary):
        primary = primary[(primary["site"] == a.params.site) & (primary["bucket"] == "all")]
    return jsonable(
        {
            "site": a.params.site,
            "method": (
                "β of each layer per seed (the per-layer aggregate of each run, fitted over widths), mean over "
                "seeds with a t-interval over seeds; Δβ per layer within each cell (Welch over seeds, Holm over "
                "the cells of one layer); the depth × optimizer interaction is Δβ (median over layers) of the "
                "deeper cell minus that of the shallower cell, equal in every other factor (Welch–Satterthwaite); "
                "lack of fit: pure-error F-test of each power law, seeds as replicates"
            ),
            "betas": records(a.layer_betas),
            "contrasts": records(a.layer_contrasts),
            "interaction": records(a.interaction),
            "lack_of_fit": records(a.lack_of_fit),
            "mde": records(primary, ["cell", "metric", "a", "b", "mde", "n_a", "n_b", "note"]),
        }
    )


def _layer(r: dict) -> str:
    return f"{r['stack']} {r['layer']}" if r.get("stack") else str(r.get("layer"))


def _metric(r: dict) -> str:
    return r["metric"]


def _deltas(r: dict) -> str:
    return f"{num(r['delta_shallow'])} / {num(r['delta_deep'])}"


def _lack(r: dict) -> bool:
    return r["p"] is not None and r["p"] < 0.05


def _runs_widths(r: dict) -> str:
    return f"{r['n']} / {r['n_widths']}"


def _note(r: dict) -> str:
    return r["note"] or ""


def _beta(r: dict) -> str:
    return f"{num(r['beta'], 3)} {interval(r['low'], r['high'])}"


def _seeds(r: dict) -> str:
    return str(r["n_seeds"]) + (" (no interval over seeds)" if r["n_seeds"] < 2 else "")


def section(d: dict) -> Section | None:
    q = d.get(KEY)
    if not q or not q["betas"]:
        return None
    site = q["site"]
    sel = [r for r in q["contrasts"] if r["site"] == site and r["bucket"] == "all" and r["metric"] == "hard_rank"]
    inter = [r for r in q["interaction"] if r["site"] == site and r["bucket"] == "all"]
    lof = [r for r in q["lack_of_fit"] if r["site"] == site and r["bucket"] == "all"]
    betas = [r for r in q["betas"] if r["site"] == site and r["bucket"] == "all" and r["metric"] != "delta_beta"]
    n_lack = sum(1 for r in lof if r["p"] is not None and r["p"] < 0.05)
    text = [
        "The headline aggregates take the median over layers; layers can disagree, so each layer is also "
        "fitted on its own (β per seed, interval over seeds). Δβ per layer is compared within each cell, "
        "Holm-adjusted over the cells of one layer.",
        f"Lack of fit: {n_lack} of {len(lof)} power laws ({site}-activation, all tokens) have a pure-error "
        "F-test p below 0.05 — there β summarises a curve, not a straight line in log–log.",
    ]
    if inter:
        text.append(
            "Depth × optimizer: the change of Δβ (median over layers) from the shallower to the deeper cell, "
            "every other factor equal; an interval above 0 means depth opens the gap."
        )
    tables = [
        table(
            f"Δβ_hard per layer within each cell, {site}-activation, all tokens.",
            [
                ("cell", get("cell")),
                ("layer", _layer),
                ("b − a", pair),
                ("Δβ_hard [CI]", diff_ci),
                ("MDE (80%)", num_of("mde")),
                ("Holm p", num_of("holm_p")),
                ("resolved", resolved),
                ("seeds", seeds_ab),
            ],
            sel,
            no_interval,
            collapsed=len(sel) > 24,
        )
    ]
    if inter:
        tables.append(
            table(
                "Depth × optimizer interaction: Δβ(deeper) − Δβ(shallower).",
                [
                    ("β", _metric),
                    ("b − a", pair),
                    ("shallower", get("shallow")),
                    ("deeper", get("deep")),
                    ("Δβ shallower / deeper", _deltas),
                    ("interaction [CI]", diff_ci),
                    ("MDE (80%)", num_of("mde")),
                ],
                inter,
                no_interval,
            )
        )
    tables += [
        table(
            f"Lack of fit of each power law, {site}-activation, all tokens (pure-error F-test).",
            [
                ("series", get("series")),
                ("rank", rank_name),
                ("F", num_of("f", 2)),
                ("p", num_of("p")),
                ("runs / widths", _runs_widths),
                ("note", _note),
            ],
            lof,
            _lack,
            collapsed=len(lof) > 12,
        ),
        table(
            f"β per layer, {site}-activation, all tokens: mean over seeds [t-interval over seeds].",
            [
                ("series", get("series")),
                ("layer", _layer),
                ("rank", rank_name),
                ("β [CI]", _beta),
                ("seeds", _seeds),
            ],
            betas,
            collapsed=True,
        ),
    ]
    return Section("per-layer", "Per layer: β, Δβ, depth and lack of fit", text, [], tables)
