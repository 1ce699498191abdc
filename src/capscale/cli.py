"""Command-line entry point: ``capscale <command> ...``.

Subcommands register themselves in ``COMMANDS`` as (help, add_arguments, run).
"""

from __future__ import annotations

import argparse
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


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "version": ("print the capscale version", _version_args, _version_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capscale",
        description="Realized spectral capacity for LLM pretraining: "
        "telemetry, width x optimizer sweeps, analysis and reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"capscale {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
