"""The report cut by question: one module per section, each owning its part of ``report.json``.

A section module defines ``KEY`` (its key in ``report.json``), ``data(analysis) -> dict``
(JSON-ready: plain values only), optionally ``answer(d) -> dict`` (its verdict, from the shared
helpers of ``capscale.report.verdicts``), ``section(d) -> Section | None`` (its part of the page,
from ``report.json``'s dict alone, so HTML, Markdown and JSON say the same thing) and, if it
draws any, ``FIGURES`` (the names of its figures in ``capscale.report.figures``). It imports only ``capscale.analysis`` and the shared ``capscale.report.format`` /
``records`` / ``betas`` / ``verdicts`` — never another section, never ``layout`` or ``data``.
Adding a section is one module here and one line in ``SECTIONS``.
"""

from __future__ import annotations

from capscale.report.sections import (
    beta_trajectory,
    design,
    dormant,
    law,
    perlayer,
    plasticity,
    q1_width,
    q2_matched,
    q3_concentration,
    q4_regimes,
    q5_optimizer_architecture,
    training,
)

# in page order; the answers follow it (a module with ``answer(d)`` adds its verdict)
SECTIONS = (
    q1_width,
    q2_matched,
    q3_concentration,
    q4_regimes,
    q5_optimizer_architecture,
    design,
    perlayer,
    dormant,
    law,
    plasticity,
    training,
    beta_trajectory,
)
