"""Self-contained HTML: inline CSS, figures as base64 PNG data URIs, no scripts, no external URLs.

Every string that is not a constant of this module goes through ``html.escape``
(run names, labels, series names, reasons, numbers alike), so a run named
``<script>…</script>`` shows as text.
"""

from __future__ import annotations

import base64
from html import escape

from capscale.report.figures import FIGURES
from capscale.report.format import FIG_REF, Section, Table
from capscale.report.layout import figure_numbers, headline_table, sections

PIN_EM = 10  # width of a pinned column: pinned columns stack at fixed offsets

CSS = """
:root { --ink: #1d232a; --muted: #5b6570; --line: #d8dde3; --flag: #fff4d6; --accent: #2b5d9b; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.3em; margin-top: 2.2em; padding-top: 0.6em; border-top: 2px solid var(--line); }
.subtitle, .caption, .empty { color: var(--muted); }
.summary { background: #f4f7fb; border: 1px solid var(--line); border-radius: 8px; padding: 12px 20px; }
.summary li { margin: 0.25em 0; }
nav ol { columns: 2; padding-left: 1.2em; }
a { color: var(--accent); }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.9em; }
.table-wrap { overflow-x: auto; margin: 0.6em 0 1.2em; max-width: 100%; }
td.pin, th.pin { position: sticky; background: #fff; z-index: 1; white-space: normal;
                 min-width: 10em; max-width: 10em; box-shadow: inset -1px 0 0 var(--line); }
th.pin { background: #eef1f5; z-index: 2; }
tr.flag td.pin { background: var(--flag); }
.answers { border-collapse: collapse; width: 100%; font-size: 0.95em; }
.answers td { white-space: normal; vertical-align: top; padding: 6px 9px; }
.answers td.q { width: 26%; font-weight: 600; }
.verdict { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 0.85em; white-space: nowrap; }
.verdict.resolved { background: #d5efd9; color: #1d5e2a; }
.verdict.not-resolved { background: #fff0c2; color: #6b5200; }
.verdict.not-measured { background: #e6e8eb; color: #4a525a; }
.figrefs { color: var(--muted); font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.86em; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 9px; text-align: left; white-space: nowrap; }
th { background: #eef1f5; position: sticky; top: 0; }
tr.flag td { background: var(--flag); }
details summary { cursor: pointer; color: var(--accent); margin: 0.4em 0; }
code { background: #f1f3f5; padding: 0 3px; border-radius: 3px; }
"""


def _cell(tag: str, text: str, j: int, t: Table) -> str:
    classes = ["answer"] if j == t.answer else []
    style = ""
    if j < t.pinned and len(t.headers) > 4:  # narrow tables need no pinning
        classes.append("pin")
        style = f' style="left: {j * PIN_EM}em"'
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f"<{tag}{cls}{style}>{escape(text)}</{tag}>"


def _table(t: Table) -> str:
    if not t.rows:
        return f'<p class="caption">{escape(t.caption)}</p><p class="empty">{escape(t.empty)}</p>'
    head = "".join(_cell("th", h, j, t) for j, h in enumerate(t.headers))
    body = []
    for i, row in enumerate(t.rows):
        cls = ' class="flag"' if t.flagged and t.flagged[i] else ""
        body.append(f"<tr{cls}>" + "".join(_cell("td", c, j, t) for j, c in enumerate(row)) + "</tr>")
    table = f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    caption = escape(t.caption)
    if t.collapsed:
        return f"<details><summary>{caption} ({len(t.rows)} rows)</summary>{table}</details>"
    return f'<p class="caption">{caption}</p>{table}'


def _ref(name: str, numbers: dict[str, int]) -> str:
    if name in numbers:
        return f'<a href="#fig-{name}">Figure {numbers[name]}</a>'
    return "the figure (not drawn: nothing to show)"


def _text(s: str, numbers: dict[str, int]) -> str:
    """Escaped text with its {fig:NAME} references as links (the token has nothing to escape)."""
    return FIG_REF.sub(lambda m: _ref(m.group(1), numbers), escape(s))


def _figure(name: str, image: bytes, number: int) -> str:
    caption = FIGURES[name][1]
    data = base64.b64encode(image).decode("ascii")
    return (
        f'<figure id="fig-{name}"><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
        f"<figcaption>Figure {number}. {escape(caption)}</figcaption></figure>"
    )


def _answers(data: dict, numbers: dict[str, int]) -> str:
    rows = []
    for a in data["answers"]:
        refs = ", ".join(_ref(f, numbers) for f in a["figures"] if f in numbers)
        rows.append(
            f'<tr id="answer-{a["id"]}"><td class="q">{escape(a["question"])}</td>'
            f'<td><span class="verdict {a["verdict"].replace(" ", "-")}">{escape(a["verdict"])}</span> '
            f"{escape(a['finding'])}" + (f' <span class="figrefs">({refs})</span>' if refs else "") + "</td></tr>"
        )
    return f'<table class="answers"><tbody>{"".join(rows)}</tbody></table>'


def _section(s: Section, images: dict[str, bytes], numbers: dict[str, int]) -> str:
    parts = [f'<section id="{s.anchor}"><h2>{escape(s.title)}</h2>']
    parts += [f"<p>{_text(p, numbers)}</p>" for p in s.text]
    parts += [_figure(f, images[f], numbers[f]) for f in s.figures if f in images]
    parts += [_table(t) for t in s.tables]
    parts.append("</section>")
    return "\n".join(parts)


def render_html(data: dict, images: dict[str, bytes]) -> str:
    """The whole page. ``data``: the report dict; ``images``: figure name → PNG bytes."""
    body = sections(data)
    numbers = figure_numbers(body, images)
    sweep = data["sweep"]
    title = f"capscale report — {sweep['name']}"
    nav = "".join(f'<li><a href="#{s.anchor}">{escape(s.title)}</a></li>' for s in body)
    findings = "".join(f"<li>{escape(f)}</li>" for f in data["summary"]["findings"])
    subtitle = (
        f"{sweep['n_runs_analysed']} runs analysed in {len(sweep['series'])} series, FFN widths "
        f"{', '.join(str(w) for w in sweep['widths'])}; generated {data['generated']} by capscale "
        f"{data['versions']['capscale']}."
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            f'<p class="subtitle">{escape(subtitle)}</p>',
            '<div class="summary"><h3>Answers</h3>',
            _answers(data, numbers),
            _table(headline_table(data)),
            f"<ul>{findings}</ul></div>" if findings else "</div>",
            f"<nav><ol>{nav}</ol></nav>",
            *(_section(s, images, numbers) for s in body),
            "</body></html>",
        ]
    )
