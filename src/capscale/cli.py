"""Command-line entry point: ``capscale <command> ...``.

Subcommands register themselves in ``COMMANDS`` as (help, add_arguments, run).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence


def _version_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="also print dependency versions")


def _version_run(args: argparse.Namespace) -> int:
    import capscale

    print(f"capscale {capscale.__version__}")
    if args.verbose:
        import numpy
        import scipy

        print(f"python {platform.python_version()}")
        print(f"numpy {numpy.__version__}")
        print(f"scipy {scipy.__version__}")
        try:
            import torch

            print(f"torch {torch.__version__} (cuda: {torch.cuda.is_available()})")
        except ImportError:
            print("torch: not installed")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    from capscale.train.config import PRESETS  # the train path loads it anyway

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=" | ".join(PRESETS))
    src.add_argument("--config", help="a TOML/YAML run config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optimizer=muon --set model.ffn_mult=8 (repeatable)",
    )
    p.add_argument("--out", required=True, help="run directory (re-running on it resumes)")


def _train_run(args: argparse.Namespace) -> int:
    from capscale.rundir import RunStatus
    from capscale.train.config import resolve
    from capscale.train.loop import train

    cfg = resolve(args.preset, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # the run's log lines
    status = train(cfg, args.out)
    print(
        f"{args.out}: {status['status']} at step {status['step']}"
        + (f" ({status['reason']})" if status.get("reason") else "")
    )
    return 0 if status["status"] == RunStatus.DONE else 1


def _sweep_args(p: argparse.ArgumentParser) -> None:
    from capscale.sweep.spec import SWEEP_PRESETS  # the sweep path loads it anyway

    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset", help=" | ".join(SWEEP_PRESETS) + " (default: the sweep that --out holds, from its sweep.json)"
    )
    src.add_argument("--config", help="a TOML/YAML sweep spec")
    p.add_argument("--out", required=True, help="sweep directory (re-running on it resumes)")
    p.add_argument(
        "--workers", type=int, default=None, help="parallel runs (default: one per GPU group, else cores / 2)"
    )
    p.add_argument("--executor", choices=("local", "slurm"), default="local", help="slurm: the spec's [slurm] table")
    p.add_argument(
        "--gpus-per-run",
        type=int,
        default=None,
        metavar="N",
        help="GPUs of each concurrent run, torchrun if > 1 (default: the spec's gpus_per_run, "
        "else 1 where GPUs are visible; 0: CPU)",
    )
    p.add_argument(
        "--gpus",
        default=None,
        metavar="IDS",
        help="the devices to share among runs, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES or all)",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only the runs whose names match this shell pattern, e.g. 'dion_*_s0' "
        "(repeatable; the others stay planned)",
    )
    p.add_argument("--status", action="store_true", help="list each run's state and run nothing")


def _sweep_run(args: argparse.Namespace) -> int:
    from collections import Counter

    from capscale.rundir import RunStatus
    from capscale.sweep import load_spec, run_sweep
    from capscale.sweep.progress import duration
    from capscale.sweep.sweep import saved_spec, select_runs, sweep_status

    if args.preset is None and args.config is None:
        spec = saved_spec(args.out)  # resuming, or asking about, the sweep that --out holds
    else:
        spec = load_spec(args.preset, args.config)
    if args.status:
        rows = sweep_status(spec, args.out)
        chosen = select_runs({r["name"]: r for r in rows}, args.only)
        counts = Counter(r["status"] for r in chosen.values())
        print(f"sweep {spec.name}: {len(chosen)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
        for name, r in chosen.items():
            live = ""
            if r.get("loss") is not None:
                live += f"  loss {r['loss']:.4g}"
            if "eta_s" in r:
                live += f"  ETA {duration(r['eta_s'])}"
            reason = f"  ({r['reason']})" if r["reason"] else ""
            print(f"  {r['status']:<12} {name:<32} step {r['step']}/{r['total']}{live}{reason}")
        return 0
    results = run_sweep(
        spec,
        args.out,
        workers=args.workers,
        executor=args.executor,
        only=args.only,
        gpus_per_run=args.gpus_per_run,
        gpus=args.gpus,
    )
    return 0 if all(r.status in (RunStatus.DONE, RunStatus.DIVERGED) for r in results) else 1  # failed or busy


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="sweep directory (default runs/demo; re-running resumes)")
    # The demo's models are small: one run per core on one thread each cost 299 CPU-seconds for the
    # whole demo, against 973 for one run at a time on two threads (same shared 2-core machine).
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("--preset", default="demo", help="sweep preset to run (default demo)")


def _demo_run(args: argparse.Namespace) -> int:
    import json
    import time

    from capscale.report.build import build_report
    from capscale.rundir import RunStatus
    from capscale.sweep import load_spec, run_sweep
    from capscale.train.corpus import CREDIT

    t0 = time.perf_counter()
    print(CREDIT)
    results = run_sweep(load_spec(args.preset), args.out, workers=args.workers or os.cpu_count() or 1)
    failed = [r for r in results if r.status not in (RunStatus.DONE, RunStatus.DIVERGED)]
    files = build_report(args.out)
    betas = files.analysis.betas
    print("\nrealized capacity, post-activation, all tokens (rank ~ width^beta, 95% t-interval):")
    _print_betas(betas)
    print("\nanswers (resolved only where the interval excludes no difference):")
    for a in json.loads(files.json.read_text(encoding="utf-8"))["answers"]:
        print(f"  [{a['verdict']}] {a['question']}\n      {a['finding']}")
    print(f"\nreport: {files.html}\n        {files.markdown}\n        {files.json}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    if failed:
        print(
            f"capscale demo: {len(failed)} run(s) did not finish: "
            + ", ".join(f"{r.name} ({r.status})" for r in failed[:5])
            + (" ..." if len(failed) > 5 else "")
            + f"; see their worker.log under {args.out}/runs/",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_betas(betas) -> None:
    rows = betas[(betas["site"] == "post") & (betas["bucket"] == "all")]
    for _, r in rows.iterrows():
        parts = [f"  {r['series']:<30}"]
        for kind in ("soft", "hard"):
            if r[f"{kind}_fittable"]:
                parts.append(
                    f"beta_{kind} {r[f'{kind}_beta']:6.3f} [{r[f'{kind}_ci_low']:6.3f}, {r[f'{kind}_ci_high']:6.3f}]"
                )
            else:
                parts.append(f"beta_{kind} not fittable ({r[f'{kind}_reason']})")
        print("  ".join(parts))


def _lazy(module: str, attr: str) -> Callable:
    """A subcommand's function, imported only when that subcommand runs or is listed."""

    def call(*args):
        import importlib

        return getattr(importlib.import_module(module), attr)(*args)

    return call


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train (or resume) one run into a run directory", _train_args, _train_run),
    "sweep": ("run (or resume) a width x optimizer x seed sweep", _sweep_args, _sweep_run),
    "demo": ("the main job: the demo sweep on the default corpus, then its report", _demo_args, _demo_run),
    "report": (
        "analyse a sweep directory and write its capacity report (HTML, Markdown, JSON)",
        _lazy("capscale.report.command", "add_arguments"),
        _lazy("capscale.report.command", "run"),
    ),
    "measure": (
        "post-hoc spectra of a saved model on local text",
        _lazy("capscale.measure", "add_arguments"),
        _lazy("capscale.measure", "run"),
    ),
    "fit": (
        "fit rank = c * width^beta for a CSV of points, one fit per group",
        _lazy("capscale.fitcli", "add_arguments"),
        _lazy("capscale.fitcli", "run"),
    ),
    "law": (
        "fit the capacity-aware scaling law of a sweep and validate it on held-out cells",
        _lazy("capscale.lawcli", "add_arguments"),
        _lazy("capscale.lawcli", "run"),
    ),
    "plasticity": (
        "continue finished runs on a second corpus: adaptation, forgetting, capacity change",
        _lazy("capscale.plasticitycli", "add_arguments"),
        _lazy("capscale.plasticitycli", "run"),
    ),
    "version": ("print the capscale version", _version_args, _version_run),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the named command's arguments are built (a command's
    options may import its module, and ``capscale --help`` should not wait for all of them)."""
    named = None
    if argv is not None:
        named = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="capscale",
        description="Realized spectral capacity for LLM pretraining: "
        "telemetry, width x optimizer sweeps, analysis and reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if argv is None or name == named:
            add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe surfaces here, not as a traceback at exit
        return code
    except BrokenPipeError:
        # The reader went away (`capscale sweep --status | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as exc:  # FileNotFoundError, the probe's SinkError, ...
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"capscale {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
