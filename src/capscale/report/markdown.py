"""report.md: the same sections as the HTML, as GitHub-flavoured Markdown; figures as linked PNG files.

Cells are escaped the Markdown way — a backslash before ``<``, ``>``, ``|`` and the
emphasis and link characters — so a run named ``<script>`` shows as text in a
renderer and reads as itself in a plain editor (no HTML entities).
"""

from __future__ import annotations

import re

from capscale.report.figures import FIGURES
from capscale.report.format import FIG_REF, Table
from capscale.report.layout import figure_numbers, headline_table, sections

_SPECIAL = re.compile(r"([\\`*\[\]<>|])")


def _cell(s: str) -> str:
    return _SPECIAL.sub(r"\\\1", str(s)).replace("\n", " ")


def _text(s: str, numbers: dict[str, int]) -> str:
    escaped = _cell(s)
    return FIG_REF.sub(lambda m: f"Figure {numbers[m.group(1)]}" if m.group(1) in numbers else "the figure", escaped)


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
    body = sections(data)
    numbers = figure_numbers(body, figure_files)
    sweep = data["sweep"]
    out = [
        f"# capscale report — {_cell(sweep['name'])}",
        "",
        (
            f"{sweep['n_runs_analysed']} runs analysed in {len(sweep['series'])} series, FFN widths "
            f"{', '.join(str(w) for w in sweep['widths'])}; generated {data['generated']} by capscale "
            f"{data['versions']['capscale']}. Rows marked ⚑ are flagged (not resolved, not fittable, "
            "not well sampled, or as noted)."
        ),
        "",
        "## Answers",
        "",
    ]
    for a in data["answers"]:
        refs = ", ".join(f"Figure {numbers[f]}" for f in a["figures"] if f in numbers)
        out.append(
            f"- **{_cell(a['question'])}** *{a['verdict']}*: {_cell(a['finding'])}" + (f" ({refs})" if refs else "")
        )
    out += ["", _table(headline_table(data))]
    out += [f"- {_cell(f)}" for f in data["summary"]["findings"]]
    for s in body:
        out += ["", f"## {_cell(s.title)}", ""]
        out += [_text(p, numbers) + "\n" for p in s.text]
        out += [
            f"![Figure {numbers[f]}. {_cell(FIGURES[f][1])}]({figure_files[f]})\n" for f in s.figures if f in numbers
        ]
        out += [_table(t) for t in s.tables]
    return "\n".join(out) + "\n"
