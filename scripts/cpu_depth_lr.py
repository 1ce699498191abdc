"""Choose the ``cpu-depth`` learning rates from the ``cpu-depth-lr`` runs by the pre-registered rule.

    python scripts/cpu_depth_lr.py runs/cpu-depth-lr        # or docs/results/cpu-depth/lr

docs/preregistration/cpu-depth.md, "Learning rates": for each optimizer and candidate rate r,
L(r) is the mean of the final validation losses of its x1 and x8 runs (+inf when a run
diverged, failed, is missing or ended with a non-finite loss). The rate with the lowest L
is chosen; rates within 0.01 nats of the lowest are tied with it, and among tied rates the
one nearest the existing default in log-rate is chosen (the smaller if two are equally
near). Prints the table of L(r) (Markdown) and the chosen rates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULTS = {"adamw": 3e-3, "muon": 0.02}
TIE = 0.01  # nats


def final_val_loss(run: Path) -> float:
    """The validation loss at the run's last step; +inf unless the run is done with a finite one."""
    try:
        status = json.loads((run / "status.json").read_text())
        cfg = json.loads((run / "config.json").read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return math.inf
    last = [r for r in records if r.get("step") == cfg["train"]["steps"] and r.get("val_loss") is not None]
    if status.get("status") != "done" or not last or not math.isfinite(last[-1]["val_loss"]):
        return math.inf
    return float(last[-1]["val_loss"])


def choose(losses: dict[float, float], default: float) -> float:
    """The pre-registered rule over ``{rate: L(rate)}``."""
    best = min(losses.values())
    if not math.isfinite(best):
        raise ValueError("no candidate rate has a finite L: every run diverged or is unfinished")
    tied = [r for r, v in losses.items() if v - best <= TIE]
    return min(tied, key=lambda r: (abs(math.log(r / default)), r))


def table(sweep: Path) -> dict[str, dict[float, dict]]:
    """Per optimizer and rate: the final validation loss at x1 (width 64), x8 (512) and their mean L."""
    out: dict[str, dict[float, dict]] = {}
    for run in sorted((sweep / "runs").iterdir()):
        # a run not started yet has only its request (the same config)
        path = run / "config.json" if (run / "config.json").is_file() else run / "request.json"
        cfg = json.loads(path.read_text())
        opt, lr, width = cfg["optimizer"]["name"], cfg["optimizer"]["params"]["lr"], cfg["model"]["ffn_width"]
        out.setdefault(opt, {}).setdefault(lr, {})[width] = final_val_loss(run)
    for rates in out.values():
        for row in rates.values():
            row["L"] = sum(row[w] for w in (64, 512)) / 2 if {64, 512} <= set(row) else math.inf
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the cpu-depth-lr sweep directory (or its export)")
    args = parser.parse_args(argv)
    rows = table(args.sweep)
    print("| optimizer | rate | val loss x1 | val loss x8 | L (mean) | chosen |")
    print("|---|---|---|---|---|---|")
    chosen = {}
    for opt in sorted(rows):
        try:
            chosen[opt] = choose({lr: r["L"] for lr, r in rows[opt].items()}, DEFAULTS[opt])
        except ValueError as exc:
            print(f"cpu_depth_lr: {opt}: {exc}", file=sys.stderr)
            return 1
        for lr in sorted(rows[opt]):
            r = rows[opt][lr]
            mark = "**yes**" if lr == chosen[opt] else ""
            print(
                f"| {opt} | {lr:g} | {r.get(64, math.inf):.4f} | {r.get(512, math.inf):.4f} | {r['L']:.4f} | {mark} |"
            )
    print("\nchosen: " + ", ".join(f"{o} {lr:g}" for o, lr in sorted(chosen.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
