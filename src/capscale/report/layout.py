"""The report's structure — sections, their text, figures and tables — built from ``report.json``'s dict.

Cells are plain, *unescaped* strings formatted from the data; the HTML and Markdown
renderers escape them. Both renderers share this layout, so the two documents say
the same thing. Text may refer to a figure as ``{fig:NAME}``; the renderers turn that
into "Figure n" (a link in HTML), numbered in order of appearance.
"""

from __future__ import annotations

import math

from capscale.analysis import ALL_BUCKETS, REGIONS
from capscale.report.format import FIG_REF, ND, Section, Table, _get, _table, interval, num  # noqa: F401
from capscale.report.sections import SECTIONS
from capscale.report.trajectory import section as _beta_trajectory
from capscale.rundir import RunStatus
from capscale.spectrum.summary import REPORT_METRICS, WELL_SAMPLED


def beta(b: dict) -> str:
    """'0.661 [0.546, 0.775]', or 'not fittable' (the reason goes in the notes column)."""
    return f"{num(b['beta'])} {interval(b['ci_low'], b['ci_high'])}" if b["fittable"] else "not fittable"


def boot(b: dict) -> str:
    if not b["fittable"] or b["boot_low"] is None:
        return "—"
    return f"{interval(b['boot_low'], b['boot_high'])} over {b['boot_over']}"


def _notes(row: dict) -> str:
    reasons = {row[k]["reason"] for k in ("beta_soft", "beta_hard") if row[k]["reason"]}
    low = row["beta_hard"]["n_low_nd"]
    if low:
        reasons.add(f"{low} point(s) with {ND}")
    return "; ".join(sorted(reasons))


def _flag(row: dict) -> bool:
    return not row["beta_hard"]["fittable"] or bool(row["beta_hard"]["n_low_nd"])


def figure_numbers(secs: list[Section], available) -> dict[str, int]:
    """Figure name → its number, in order of appearance among the figures drawn."""
    names = [f for s in secs for f in s.figures if f in available]
    return {f: i + 1 for i, f in enumerate(names)}


def _levels_table(d: dict) -> Table:
    rows = [r for r in d["levels"] if r["bucket"] == "all"]

    def ratio(r):
        return f"{num(r['ratio'], 2)}× {interval(r['ratio_low'], r['ratio_high'], 2)}"

    return _table(
        "Rank ratios of pairs of series at matched widths, all tokens (higher over lower).",
        [
            ("series", _get("series")),
            ("over", _get("baseline")),
            ("rank", lambda r: {"soft_rank": "R1", "hard_rank": "R2"}[r["metric"]]),
            ("ratio [CI]", ratio),
            ("resolved", lambda r: "yes" if r["resolved"] else "no"),
            ("per width", lambda r: f"{num(r['ratio_min'], 2)}–{num(r['ratio_max'], 2)}×"),
            (
                "Δ loss (nats) [CI]",
                lambda r: f"{num(r['loss_diff'], 3)} {interval(r['loss_diff_low'], r['loss_diff_high'])}",
            ),
            ("widths", lambda r: ", ".join(str(w) for w in r["widths"])),
            ("seeds", _get("n_seeds")),
        ],
        rows,
        lambda r: not r["resolved"],
        pinned=2,
        answer=3,
        collapsed=len(rows) > 12,
        empty="a single series: no pair to compare",
    )


# -- sections ------------------------------------------------------------------------


def headline_table(d: dict) -> Table:
    cols = [
        ("series", _get("series")),
        ("β_soft [95% CI]", lambda r: beta(r["beta_soft"])),
        ("β_hard [95% CI]", lambda r: beta(r["beta_hard"])),
        ("Δβ [95% CI]", lambda r: beta(r["beta_delta"])),
        ("R² soft", lambda r: num(r["beta_soft"]["r2"])),
        ("R² hard", lambda r: num(r["beta_hard"]["r2"])),
        ("runs", lambda r: num(r["beta_soft"]["n"])),
        ("widths", _get("n_widths")),
        ("notes", _notes),
    ]
    site = d["parameters"]["site"]
    return _table(
        f"Scaling exponents, {site}-activation, all tokens (rank ∝ width^β).", cols, d["summary"]["headline"], _flag
    )


def _beta_columns(with_bucket: bool, with_site: bool) -> list:
    cols = [("series", _get("series"))]
    if with_site:
        cols.append(("site", _get("site")))
    if with_bucket:
        cols.append(("tokens", lambda r: r["bucket"].upper()))
    cols += [
        ("β_soft [95% CI]", lambda r: beta(r["beta_soft"])),
        ("β_soft bootstrap", lambda r: boot(r["beta_soft"])),
        ("β_hard [95% CI]", lambda r: beta(r["beta_hard"])),
        ("β_hard bootstrap", lambda r: boot(r["beta_hard"])),
        ("Δβ [95% CI]", lambda r: beta(r["beta_delta"])),
        ("R² soft / hard", lambda r: f"{num(r['beta_soft']['r2'])} / {num(r['beta_hard']['r2'])}"),
        ("n", lambda r: num(r["beta_soft"]["n"])),
        ("notes", _notes),
    ]
    return cols


def _q1(d: dict) -> Section:
    rows = [b for b in d["betas"] if b["bucket"] == "all"]
    points: dict[tuple, dict] = {}
    for p in d["q1_scaling"]["points"]:
        if p["bucket"] == "all" and p["metric"] in [m.name for m in REPORT_METRICS]:
            points.setdefault((p["series"], p["site"], p["width"]), {})[p["metric"]] = p

    def spread(metric):
        return lambda r: (
            f"{num(r[metric]['median'], 1)} [{num(r[metric]['min'], 1)}, {num(r[metric]['max'], 1)}]"
            if metric in r
            else "—"
        )

    prow = [{"series": s, "site": site, "width": w, **v} for (s, site, w), v in sorted(points.items())]
    return Section(
        "q1",
        "1. Does added width become capacity? Rank vs width, per optimizer",
        [
            (
                "Each run is aggregated to one rank per site and token bucket (the paper's rule, stated under Parameters); "
                "β is the OLS slope of log rank on log width over the runs of a series (seeds as replicate points). "
                "β = 1: every added unit of width becomes a variance-carrying direction; β < 1: capacity grows slower than "
                "width. The soft rank R1 counts directions carrying any variance, the hard rank R2 the directions the "
                "energy actually spreads over. {fig:scaling} shows the ranks and the fitted laws (with their "
                "confidence bands when the design has one cell; per cell otherwise, intervals in the tables)."
            ),
            (
                "β compares growth; levels compare how much capacity each series realises at the same width. "
                "{fig:levels} and the first table give each pair's rank ratio: the geometric mean over the widths "
                "both series ran, with a t-interval over widths (seed noise and any drift with width included). "
                "A ratio is resolved when its interval excludes 1×."
            ),
        ],
        ["scaling", "levels"],
        [
            _levels_table(d),
            _table(
                "β per series and site, all tokens (t-interval and bootstrap interval).",
                _beta_columns(False, True),
                rows,
                _flag,
            ),
            _table(
                "Aggregated ranks per width: median over seeds [min, max].",
                [
                    ("series", _get("series")),
                    ("site", _get("site")),
                    ("width", _get("width")),
                    *[(m.label, spread(m.name)) for m in REPORT_METRICS],
                    ("seeds", lambda r: num(r.get(REPORT_METRICS[0].name, {}).get("n_seeds"))),
                ],
                prow,
                collapsed=True,
            ),
        ],
    )


def _pair_beta(row: dict, kind: str, side: str) -> str:
    b = row.get(f"beta_{kind}_{side}")
    return f"{num(b)} {interval(row.get(f'beta_{kind}_low_{side}'), row.get(f'beta_{kind}_high_{side}'))}"


def _q2(d: dict) -> Section:
    q = d["q2_matched_loss"]
    cols = [
        ("geometry", _get("geometry")),
        ("width", _get("width")),
        ("series A", _get("series_a")),
        ("series B", _get("series_b")),
        ("loss B − A", _get("loss_diff", 4)),
        (
            "R2 B / A [CI]",
            lambda r: (
                f"{num(r.get('hard_ratio'), 2)}× {interval(r.get('hard_ratio_low'), r.get('hard_ratio_high'), 2)}"
            ),
        ),
        (
            "β_hard B − A [CI]",
            lambda r: f"{num(r.get('hard_diff'))} {interval(r.get('hard_diff_low'), r.get('hard_diff_high'))}",
        ),
        (
            "β_soft B − A [CI]",
            lambda r: f"{num(r.get('soft_diff'))} {interval(r.get('soft_diff_low'), r.get('soft_diff_high'))}",
        ),
        ("val loss A", _get("val_loss_a", 4)),
        ("val loss B", _get("val_loss_b", 4)),
        ("β_hard A", lambda r: _pair_beta(r, "hard", "a")),
        ("β_hard B", lambda r: _pair_beta(r, "hard", "b")),
        ("Δβ A / B", lambda r: f"{num(r.get('beta_delta_a'))} / {num(r.get('beta_delta_b'))}"),
    ]
    for bucket in ALL_BUCKETS:
        cols.append(
            (
                f"R2/D {bucket.upper()} A / B",
                lambda r, b=bucket: f"{num(r.get(f'hard_frac_{b}_a'))} / {num(r.get(f'hard_frac_{b}_b'))}",
            )
        )
    cols.append(("log(R1/R2) A / B", lambda r: f"{num(r.get('asymmetry_a'))} / {num(r.get('asymmetry_b'))}"))
    losses = [
        ("series", _get("series")),
        ("width", _get("width")),
        ("val loss", _get("val_loss", 4)),
        ("min", _get("val_loss_min", 4)),
        ("max", _get("val_loss_max", 4)),
        ("seeds", _get("n_seeds")),
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
        ["matched_loss"],
        [
            _table(
                "Matched-loss pairs.",
                cols,
                q["pairs"],
                lambda r: r["geometry"] == "different",
                empty="no pair of series agrees within the tolerance at a common width",
                pinned=1,
            ),
            _table("Final validation loss per series and width.", losses, q["loss_by_width"], collapsed=True),
        ],
    )


def _q3(d: dict) -> Section:
    q = d["q3_asymmetry"]
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
        ["asymmetry", "phase_map"],
        [
            _table(
                "Δβ per series and site, all tokens.",
                [
                    ("series", _get("series")),
                    ("site", _get("site")),
                    ("Δβ [95% CI]", lambda r: beta(r["beta_delta"])),
                    ("Δβ bootstrap", lambda r: boot(r["beta_delta"])),
                    ("β_soft", lambda r: num(r["beta_soft"]["beta"])),
                    ("β_hard", lambda r: num(r["beta_hard"]["beta"])),
                    ("notes", _notes),
                ],
                delta,
                _flag,
            ),
            _table(
                "Runs per phase region.",
                [("series", _get("series"))] + [(reg, lambda r, reg=reg: str(r.get(reg, 0))) for reg in regions],
                count_rows,
            ),
            _table(
                "Phase map points (one per run).",
                [
                    ("run", _get("name")),
                    ("series", _get("series")),
                    ("width", _get("width")),
                    ("seed", _get("seed")),
                    ("R1/D", _get("soft_frac")),
                    ("R2/D", _get("hard_frac")),
                    ("R2/R1", _get("balance")),
                    ("region", _get("region")),
                    ("sampling", _get("worst_status")),
                ],
                q["phase"],
                lambda r: r["region"] == "impossible" or r["worst_status"] != "well_sampled",
                collapsed=True,
            ),
        ],
    )


def _q4(d: dict) -> Section:
    q = d["q4_regimes"]
    cap = [
        ("series", _get("series")),
        ("width", _get("width")),
        ("tokens", lambda r: r["bucket"].upper()),
        ("final val loss", _get("val_loss", 4)),
        *[(m.label, _get(m.name, 1)) for m in REPORT_METRICS],
        *[(f"{m.label}/D", _get(m.frac)) for m in REPORT_METRICS if m.frac],
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
        ["regimes", "bucket_loss"],
        [
            _table("β by token regime.", _beta_columns(True, False), q["betas"], _flag),
            _table(
                "Per-bucket final validation loss and capacity (median over seeds).",
                cap,
                q["bucket_capacity"],
                collapsed=True,
            ),
        ],
    )


def _training(d: dict) -> Section:
    cols = [
        ("run", _get("run_id")),
        ("series", _get("series")),
        ("width", _get("width")),
        ("seed", _get("seed")),
        ("val loss", _get("final_val_loss", 4)),
        ("HEAD", _get("final_val_loss_head", 4)),
        ("MID", _get("final_val_loss_mid", 4)),
        ("TAIL", _get("final_val_loss_tail", 4)),
    ]
    return Section(
        "training",
        "Training: loss curves and rank trajectories",
        [
            (
                "{fig:loss_curves} shows the loss curves; the rank trajectories ({fig:rank_trajectories}: ranks per "
                "unit width over training, median over layers) show whether the final aggregate was taken on a "
                "plateau or while ranks were still moving."
            ),
        ],
        ["loss_curves", "rank_trajectories"],
        [_table("Final validation losses per run.", cols, d["training"]["final"], collapsed=True)],
    )


def _reliability(d: dict) -> Section:
    low = d["reliability"]["low_nd"]
    cols = [
        ("run", _get("name")),
        ("series", _get("series")),
        ("width", _get("width")),
        ("seed", _get("seed")),
        ("site", _get("site")),
        ("tokens", lambda r: r["bucket"].upper()),
        ("sampling", _get("worst_status")),
        ("min N/D", _get("min_samples_per_dim", 1)),
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
        [_table(f"Aggregates with N/D below {WELL_SAMPLED:g}.", cols, low, lambda r: True, collapsed=len(low) > 12)],
    )


def _runs(d: dict) -> Section:
    excluded = [
        ("run", _get("run_id")),
        ("name", _get("name")),
        ("status", _get("status")),
        ("reason", _get("reason")),
        ("step", _get("step")),
        ("label", _get("label")),
        ("width", _get("width")),
    ]
    arch = d["sweep"]["arch_axes"]
    analysed = (
        [
            ("run", _get("run_id")),
            ("name", _get("name")),
            ("series", _get("series")),
            ("optimizer", _get("optimizer")),
            ("steps", _get("steps")),
            ("width", _get("width")),
            ("seed", _get("seed")),
        ]
        + [(a, _get(a)) for a in arch]
        + [("final val loss", _get("final_val_loss", 4))]
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
            _table(
                "Runs not analysed.",
                excluded,
                d["excluded_runs"],
                lambda r: r["status"] in (RunStatus.FAILED, RunStatus.DIVERGED),
            ),
            _table("Runs analysed.", analysed, d["runs"], collapsed=True),
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
            _table(
                "Analysis parameters.",
                [
                    ("parameter", lambda r: r[0]),
                    ("value", lambda r: f"{r[1]:g}" if isinstance(r[1], float) else str(r[1])),
                    ("meaning", lambda r: r[2]),
                ],
                rows,
            ),
            _table("Versions.", [("package", _get("package")), ("version", _get("version"))], versions),
        ],
    )


def _appendix(d: dict) -> Section:
    return Section(
        "all-betas",
        "Appendix: every fit",
        ["β_soft, β_hard and Δβ for every series × site × token bucket (also in report.json under 'betas')."],
        [],
        [_table("All fits.", _beta_columns(True, True), d["betas"], _flag, collapsed=True)],
    )


def sections(d: dict) -> list[Section]:
    """The report body in order: the five questions, then training, reliability, runs, parameters."""
    return [
        _q1(d),
        _q2(d),
        _q3(d),
        _q4(d),
        *[s for s in (module.section(d) for module in SECTIONS) if s is not None],
        _training(d),
        _beta_trajectory(d),
        _reliability(d),
        _runs(d),
        _parameters(d),
        _appendix(d),
    ]
