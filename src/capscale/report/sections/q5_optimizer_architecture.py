"""Question 5 — which moves β more, the optimizer or the architecture? (``report.json`` key
``q5_optimizer_architecture``): its data, its verdict and its part of the page, in one module.
Its figure is ``figures.fig_opt_arch`` (``optimizer_architecture``)."""

from __future__ import annotations

from capscale.analysis import Analysis
from capscale.report.format import Section, get, interval, num, table, widths
from capscale.report.records import jsonable, records
from capscale.report.verdicts import NOT_MEASURED, NOT_RESOLVED, RESOLVED, answer_for, f2, iv

KEY = "q5_optimizer_architecture"
FIGURES = ("optimizer_architecture",)


def data(a: Analysis) -> dict:
    return jsonable(
        {
            "arch_axes": list(a.sweep.arch_axes),
            "cells": records(a.cells),
            "effects": records(a.effects),
            "summary": records(a.effect_summary),
        }
    )


def answer(d: dict) -> dict:
    q = d[KEY]
    if not q["arch_axes"]:
        return answer_for(
            "q5",
            NOT_MEASURED,
            "No architecture axis varied in this sweep, so only optimizer effects are measured; a sweep with an "
            "arch axis (e.g. the cpu preset's no-position arm) is needed to compare.",
            ["optimizer_architecture"],
        )
    s = {r["metric"]: r for r in q["summary"]}.get("hard")
    if not s or s.get("optimizer_span") is None or s.get("architecture_span") is None:
        return answer_for(
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
        return answer_for("q5", RESOLVED, f"{text}: the {s['larger']} effect is larger.", ["optimizer_architecture"])
    return answer_for(
        "q5",
        NOT_RESOLVED,
        f"{text}: the intervals overlap, so which effect is larger is not resolved (the point estimates favour the "
        f"{s['point_larger']}); more seeds per width on both axes would be needed.",
        ["optimizer_architecture"],
    )


def _beta(kind: str):
    def cell(r: dict) -> str:
        if not r[f"{kind}_fittable"]:
            return "not fittable"
        return f"{num(r[f'{kind}_beta'])} {interval(r[f'{kind}_ci_low'], r[f'{kind}_ci_high'])}"

    return cell


def _or(key: str, default: str):
    """The row's ``key``, or ``default`` where it is empty."""

    def cell(r: dict) -> str:
        return r.get(key) or default

    return cell


def _span(r: dict) -> str:
    return f"{num(r['span'])} {interval(r.get('span_low'), r.get('span_high'))}"


def _median_span(effect: str):
    def cell(r: dict) -> str:
        return f"{num(r[f'{effect}_span'])} within {interval(r.get(f'{effect}_low'), r.get(f'{effect}_high'))}"

    return cell


def section(d: dict) -> Section:
    q = d[KEY]
    axes = q["arch_axes"]
    text = (
        "Architecture axes varied: " + ", ".join(axes) + ". "
        if axes
        else "No architecture axis varied in this sweep, so only optimizer effects are shown. "
    )
    text += (
        "Optimizer effect: spread of β across optimizer settings on one architecture; architecture effect: "
        "spread of β across architectures for one optimizer setting. Each spread compares β refitted on "
        "the widths the compared series share, so that curvature over a wider range is not read as an effect; "
        "its interval is that of the difference of the two β. One effect is called larger only when all its "
        "spans' intervals lie above all the other's ({fig:optimizer_architecture})."
    )
    return Section(
        "q5",
        "5. Optimizer or architecture: which moves β more?",
        [text],
        list(FIGURES),
        [
            table(
                "β per optimizer setting × architecture (all tokens).",
                [
                    ("optimizer setting", get("setting")),
                    ("architecture", _or("arch", "(single)")),
                    ("β_soft", _beta("soft")),
                    ("β_hard", _beta("hard")),
                    ("Δβ", _beta("delta")),
                ],
                q["cells"],
            ),
            table(
                "Spans of β, each refitted on the widths its series share.",
                [
                    ("effect", get("kind")),
                    ("within", _or("within", "(single)")),
                    ("β", get("metric")),
                    ("span [CI]", _span),
                    ("highest", get("highest")),
                    ("lowest", get("lowest")),
                    ("compared", get("n_compared")),
                    ("widths", widths),
                ],
                q["effects"],
                empty="fewer than two settings or architectures with 3 shared widths to compare",
            ),
            table(
                "Median spans, with the envelope of their intervals.",
                [
                    ("β", get("metric")),
                    ("larger", _or("larger", "not resolved")),
                    ("optimizer", _median_span("optimizer")),
                    ("architecture", _median_span("architecture")),
                    ("point estimates favour", _or("point_larger", "—")),
                ],
                q["summary"],
            ),
        ],
    )
