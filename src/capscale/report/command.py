"""``capscale report SWEEP_DIR``: the command-line face of ``build_report`` (wired in by ``capscale.cli``)."""

from __future__ import annotations

import argparse

# Flag → AnalysisParams / PhaseThresholds field and its meaning; the "(default ...)" each
# help shows is read from those dataclasses, so it cannot drift from what the analysis does.
# Flags left unset fall back to the sweep's sweep.json "analysis" table, then to those defaults.
_OPTIONS = {
    "last_k": ("--last-k", int, "logged steps per layer in the final aggregate (the paper: 5)"),
    "tolerance": ("--tolerance", float, "matched-loss tolerance on final validation loss, nats"),
    "confidence": ("--confidence", float, "interval level"),
    "n_resamples": ("--bootstrap", int, "bootstrap resamples"),
    "site": ("--site", str, "headline site: post or pre"),
    "collapsed_soft": ("--collapsed-soft", float, "phase map: collapsed if R1/D below"),
    "broad_soft": ("--broad-soft", float, "phase map: broad if R1/D at or above"),
    "brittle_ratio": ("--brittle-ratio", float, "phase map: brittle if R2/R1 below"),
}


def defaults() -> dict:
    """Every analysis parameter's default, from ``AnalysisParams`` and ``PhaseThresholds`` (NumPy-free import)."""
    from dataclasses import fields

    from capscale.analysis.phase import PhaseThresholds
    from capscale.analysis.pipeline import AnalysisParams

    out = {f.name: f.default for f in fields(AnalysisParams) if f.name != "phase"}
    out.update({f.name: f.default for f in fields(PhaseThresholds)})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sweep_dir",
        metavar="SWEEP_DIR",
        help="a sweep directory (with runs/), one run directory, or any directory with run directories below it",
    )
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (default SWEEP_DIR/report)")
    default = defaults()
    for dest, (flag, kind, help_) in _OPTIONS.items():
        parser.add_argument(
            flag,
            dest=dest,
            type=kind,
            default=None,
            # unset flags take the sweep's own value first (the demo's last_k is 3), so say so
            help=f"{help_}; unset: the sweep's analysis.{dest}, if it has one (default {default[dest]:g})"
            if not isinstance(default[dest], str)
            else f"{help_}; unset: the sweep's analysis.{dest}, if it has one (default {default[dest]})",
        )


def run(args: argparse.Namespace) -> int:
    from capscale.report.build import build_report  # matplotlib loads only when a report is built

    params = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    import sys

    files = build_report(
        args.sweep_dir, args.out, progress=lambda line: print(line, file=sys.stderr, flush=True), **params
    )
    sweep = files.analysis.sweep
    print(
        f"analysed {len(sweep.runs)} run(s) in {sweep.runs['series'].nunique()} series; "
        f"{len(sweep.excluded)} not analysed"
    )
    for _, r in sweep.excluded.iterrows():
        print(f"  not analysed: {r['run_id']} ({r['reason']})")
    print(f"report: {files.html}")
    print(f"        {files.markdown}")
    print(f"        {files.json}")
    return 0
