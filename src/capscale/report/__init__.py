"""capscale.report: the capacity report — figures, self-contained HTML, Markdown and JSON.

    from capscale.report import build_report
    files = build_report("sweeps/demo")          # → sweeps/demo/report/index.html, report.md, report.json

Imports ``capscale.analysis`` (and matplotlib, Agg canvas only); nothing above it.
The names below load on first use (PEP 562), so ``capscale.report.command`` — which
the CLI imports at start-up — does not pull in matplotlib for other commands.
"""

from importlib import import_module

_EXPORTS = {
    "ReportFiles": "capscale.report.build",
    "build_report": "capscale.report.build",
    "report_data": "capscale.report.data",
}

__all__ = ["ReportFiles", "build_report", "report_data"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'capscale.report' has no attribute {name!r}")
