"""The report cut by question: one module per section, each owning its part of ``report.json``.

A section module defines ``KEY`` (its key in ``report.json``), ``data(analysis) -> dict``
(JSON-ready: plain values only), optionally ``answer(d) -> dict`` (its verdict), and
``section(d) -> Section | None`` (its part of the page,
from ``report.json``'s dict alone, so HTML, Markdown and JSON say the same thing). It
imports only ``capscale.analysis`` and the shared ``capscale.report.format`` /
``capscale.report.records`` (and the verdict helpers of ``capscale.report.answers``) — never
another section, never ``layout``. Adding a section is one module here
and one line in ``SECTIONS``.
"""

from __future__ import annotations

from capscale.report.sections import design, dormant, law, perlayer, plasticity, q5_optimizer_architecture

# in page order, after questions 1–4 (a module with ``answer(d)`` adds its verdict to the answers)
SECTIONS = (q5_optimizer_architecture, design, perlayer, dormant, law, plasticity)
