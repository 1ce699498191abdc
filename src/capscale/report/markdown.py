"""report.md: the same sections as the HTML, as GitHub-flavoured Markdown; figures as linked PNG files.

Cells are HTML-escaped too (Markdown passes raw HTML through) and pipes escaped.
"""

from __future__ import annotations

from html import escape

from capscale.report.figures import FIGURES
from capscale.report.layout import Table, headline_table, sections


def _cell(s: str) -> str:
    return escape(s, quote=False).replace("|", "\\|").replace("\n", " ")


def _table(t: Table) -> str:
    if not t.rows:
        return f"*{_cell(t.caption)}* — {_cell(t.empty)}\n"
    lines = ["| " + " | ".join(_cell(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers)]
    for i, row in enumerate(t.rows):
        cells = [_cell(c) for c in row]
        if t.flagged and t.flagged[i]:
            cells[0] = f"⚑ {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if t.collapsed:
        return f"<details><summary>{_cell(t.caption)} ({len(t.rows)} rows)</summary>\n\n{table}\n\n</details>\n"
    return f"*{_cell(t.caption)}*\n\n{table}\n"


def render_markdown(data: dict, figure_files: dict[str, str]) -> str:
    """``figure_files``: figure name → path relative to report.md."""
    sweep = data["sweep"]
    out = [
        f"# capscale report — {_cell(sweep['name'])}",
        "",
        (
            f"{sweep['n_runs_analysed']} runs analysed in {len(sweep['series'])} series, FFN widths "
            f"{', '.join(str(w) for w in sweep['widths'])}; generated {data['generated']} by capscale "
            f"{data['versions']['capscale']}. Rows marked ⚑ are flagged (not fittable, N/D < 10, or as noted)."
        ),
        "",
        "## Summary",
        "",
        _table(headline_table(data)),
    ]
    out += [f"- {_cell(f)}" for f in data["summary"]["findings"]]
    for s in sections(data):
        out += ["", f"## {_cell(s.title)}", ""]
        out += [_cell(p) + "\n" for p in s.text]
        out += [f"![{_cell(FIGURES[f][1])}]({figure_files[f]})\n" for f in s.figures if f in figure_files]
        out += [_table(t) for t in s.tables]
    return "\n".join(out) + "\n"
