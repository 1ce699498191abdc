"""The page: the summary's headline table, the sections in order, and the report's closing sections
(reliability, runs, parameters, the appendix of every fit), built from ``report.json``'s dict.

The questions and the other parts with data of their own are modules of
``capscale.report.sections``; this module only assembles them. Cells are plain, *unescaped*
strings formatted from the data; the HTML and Markdown renderers escape them. Both renderers
share this layout, so the two documents say the same thing. Text may refer to a figure as
``{fig:NAME}``; the renderers turn that into "Figure n" (a link in HTML), numbered in order of
appearance.
"""

from __future__ import annotations

from capscale.report.format import ND, Section, Table, beta, beta_columns, beta_flag, beta_notes, get, num, table
from capscale.report.sections import SECTIONS
from capscale.rundir import RunStatus
from capscale.spectrum.summary import WELL_SAMPLED


def figure_numbers(secs: list[Section], available) -> dict[str, int]:
    """Figure name → its number, in order of appearance among the figures drawn."""
    names = [f for s in secs for f in s.figures if f in available]
    return {f: i + 1 for i, f in enumerate(names)}


def _soft(r: dict) -> str:
    return beta(r["beta_soft"])


def _hard(r: dict) -> str:
    return beta(r["beta_hard"])


def _delta(r: dict) -> str:
    return beta(r["beta_delta"])


def _r2(kind: str):
    def cell(r: dict) -> str:
        return num(r[f"beta_{kind}"]["r2"])

    return cell


def _n_runs(r: dict) -> str:
    return num(r["beta_soft"]["n"])


def headline_table(d: dict) -> Table:
    """The summary's table: β_soft, β_hard and Δβ of every series, headline site, all tokens."""
    cols = [
        ("series", get("series")),
        ("β_soft [95% CI]", _soft),
        ("β_hard [95% CI]", _hard),
        ("Δβ [95% CI]", _delta),
        ("R² soft", _r2("soft")),
        ("R² hard", _r2("hard")),
        ("runs", _n_runs),
        ("widths", get("n_widths")),
        ("notes", beta_notes),
    ]
    site = d["parameters"]["site"]
    return table(
        f"Scaling exponents, {site}-activation, all tokens (rank ∝ width^β).", cols, d["summary"]["headline"], beta_flag
    )


def _tokens(r: dict) -> str:
    return r["bucket"].upper()


def _always(r: dict) -> bool:
    return True


def _failed(r: dict) -> bool:
    return r["status"] in (RunStatus.FAILED, RunStatus.DIVERGED)


def _parameter(r: tuple) -> str:
    return r[0]


def _value(r: tuple) -> str:
    return f"{r[1]:g}" if isinstance(r[1], float) else str(r[1])


def _meaning(r: tuple) -> str:
    return r[2]


def _reliability(d: dict) -> Section:
    low = d["reliability"]["low_nd"]
    cols = [
        ("run", get("name")),
        ("series", get("series")),
        ("width", get("width")),
        ("seed", get("seed")),
        ("site", get("site")),
        ("tokens", _tokens),
        ("sampling", get("worst_status")),
        ("min N/D", get("min_samples_per_dim", 1)),
    ]
    text = (
        f"{len(low)} of {d['reliability']['n_aggregates']} aggregates (run × site × bucket) use records with "
        f"fewer than {WELL_SAMPLED:g} samples per dimension (N/D); their ranks are biased low by sampling, most in "
        f"TAIL buckets and at large widths. They are kept in the fits and flagged (highlighted rows; '{ND}' in "
        "the notes)."
        if low
        else f"Every aggregate rests on well-sampled records (N/D ≥ {WELL_SAMPLED:g})."
    )
    return Section(
        "reliability",
        "Reliability: samples per dimension",
        [text],
        [],
        [table(f"Aggregates with N/D below {WELL_SAMPLED:g}.", cols, low, _always, collapsed=len(low) > 12)],
    )


def _runs(d: dict) -> Section:
    excluded = [
        ("run", get("run_id")),
        ("name", get("name")),
        ("status", get("status")),
        ("reason", get("reason")),
        ("step", get("step")),
        ("label", get("label")),
        ("width", get("width")),
    ]
    arch = d["sweep"]["arch_axes"]
    analysed = (
        [
            ("run", get("run_id")),
            ("name", get("name")),
            ("series", get("series")),
            ("optimizer", get("optimizer")),
            ("steps", get("steps")),
            ("width", get("width")),
            ("seed", get("seed")),
        ]
        + [(a, get(a)) for a in arch]
        + [("final val loss", get("final_val_loss", 4))]
    )
    return Section(
        "runs",
        "Runs",
        [
            (
                f"{d['sweep']['n_runs_analysed']} run(s) analysed, {d['sweep']['n_runs_excluded']} not analysed "
                "(failed, diverged, unfinished or unreadable runs are listed here and left out of every fit)."
            )
        ],
        [],
        [
            table(
                "Runs not analysed.",
                excluded,
                d["excluded_runs"],
                _failed,
            ),
            table("Runs analysed.", analysed, d["runs"], collapsed=True),
        ],
    )


def _parameters(d: dict) -> Section:
    p = d["parameters"]
    ph = p["phase"]
    rows = [
        ("last_k", p["last_k"], p["aggregation"]),
        ("tolerance", p["tolerance"], "matched-loss tolerance on the final validation loss (nats)"),
        ("confidence", p["confidence"], p["fit"]),
        (
            "n_resamples",
            p["n_resamples"],
            "bootstrap resamples (seed " + str(p["bootstrap_seed"]) + "); over seeds "
            "when every width has ≥ 3, else over the layers of the width's runs",
        ),
        ("site", p["site"], "headline site (paper: post-activation)"),
        ("collapsed_soft", ph["collapsed_soft"], "phase map: collapsed if R1/D below"),
        ("brittle_ratio", ph["brittle_ratio"], "phase map: brittle if R2/R1 below"),
        ("broad_soft", ph["broad_soft"], "phase map: broad if R1/D at or above (and not brittle)"),
        ("impossible_tol", ph["impossible_tol"], "phase map: impossible if R2/D > (R1/D)·(1 + tol)"),
    ]
    versions = [{"package": k, "version": v} for k, v in d["versions"].items()]
    return Section(
        "parameters",
        "Parameters and versions",
        [],
        [],
        [
            table(
                "Analysis parameters.",
                [
                    ("parameter", _parameter),
                    ("value", _value),
                    ("meaning", _meaning),
                ],
                rows,
            ),
            table("Versions.", [("package", get("package")), ("version", get("version"))], versions),
        ],
    )


def _appendix(d: dict) -> Section:
    return Section(
        "all-betas",
        "Appendix: every fit",
        ["β_soft, β_hard and Δβ for every series × site × token bucket (also in report.json under 'betas')."],
        [],
        [table("All fits.", beta_columns(True, True), d["betas"], beta_flag, collapsed=True)],
    )


def sections(d: dict) -> list[Section]:
    """The report body in order: the sections (questions, design, training, ...), then reliability, runs,
    parameters and the appendix."""
    return [
        *[s for s in (module.section(d) for module in SECTIONS) if s is not None],
        _reliability(d),
        _runs(d),
        _parameters(d),
        _appendix(d),
    ]
