"""``build_report``: a sweep directory → ``report/index.html``, ``report.md``, ``report.json``, ``figures/*.png``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capscale.analysis import Analysis, AnalysisParams, analyze, load_sweep
from capscale.atomic import atomic_write_bytes
from capscale.report.data import report_data
from capscale.report.figures import render_figures
from capscale.report.html import render_html
from capscale.report.markdown import render_markdown


@dataclass(frozen=True)
class ReportFiles:
    out_dir: Path
    html: Path
    markdown: Path
    json: Path
    figures: dict[str, Path]
    analysis: Analysis


def _write(path: Path, content: str | bytes) -> None:
    """Atomic write: a report being rebuilt is never seen half-written."""
    atomic_write_bytes(path, content.encode("utf-8") if isinstance(content, str) else content)


def build_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **analysis_params: Any,
) -> ReportFiles:
    """Analyse ``sweep_dir`` and write the report (default ``SWEEP_DIR/report/``).

    ``analysis_params``: ``AnalysisParams`` fields and phase thresholds (e.g.
    ``last_k=5, tolerance=0.02, brittle_ratio=0.25``). Defaults come from the
    ``analysis`` table of the sweep's ``sweep.json`` when it has one; explicit
    parameters win. ``progress``: called with a line per stage (the command prints them).
    """
    start = time.monotonic()

    def say(text: str) -> None:
        if progress is not None:
            progress(f"[{time.monotonic() - start:5.1f}s] {text}")

    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)  # said once read: a run directory refused here gives its one line only
    say(f"read the runs in {sweep_dir}")
    defaults = dict((sweep.spec or {}).get("analysis") or {})
    params = AnalysisParams.create(**{**defaults, **analysis_params})
    say(f"analysing {len(sweep.runs)} run(s) ({len(sweep.spectra):,} spectra rows)")
    analysis = analyze(sweep, params, progress=say)
    say("writing report.json")
    data = report_data(analysis)
    images = render_figures(analysis, say)
    say("writing the pages")
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    figures = {name: out / "figures" / f"{name}.png" for name in images}
    for name, path in figures.items():
        _write(path, images[name])
    _write(out / "report.json", json.dumps(data, indent=1, allow_nan=False, ensure_ascii=False) + "\n")
    _write(out / "report.md", render_markdown(data, {n: f"figures/{n}.png" for n in images}))
    _write(out / "index.html", render_html(data, images))
    return ReportFiles(
        out_dir=out,
        html=out / "index.html",
        markdown=out / "report.md",
        json=out / "report.json",
        figures=figures,
        analysis=analysis,
    )
