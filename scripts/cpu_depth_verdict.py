"""The pre-registered verdict of the ``cpu-depth`` study, computed as the pre-registration defines it.

    python scripts/cpu_depth_verdict.py docs/results/cpu-depth [--rep docs/results/cpu-depth/rep] [--json]

docs/preregistration/cpu-depth.md, "Measures":

- **D** (primary) = Δβ_hard = β_hard(Muon) − β_hard(AdamW) at depth 6: post-activation, all
  tokens, each run's final measurement (the window of its last steps), one point per run =
  the median over layers of its hard rank; one least-squares fit
  log R = c + β·log w + g·(c′ + Δβ·log w) over both optimizers' runs (each its own intercept
  and slope, one residual variance), 95% t-interval with n − 4 degrees of freedom. This is
  ``capscale.analysis.trajectories._slope_difference``, the code the pre-registration names.
- **I** (depth × optimizer) = (β_Muon,6 − β_AdamW,6) − (β_Muon,2 − β_AdamW,2), from one fit over
  both depths with an intercept and a slope per (optimizer, depth) cell and one residual
  variance, 95% t-interval with n − 8 degrees of freedom.
- **Repetition**: the same contrast with the repetition arm in place of depth 2 (arm minus
  the main depth-6 cells); repetition "does not move the result" if its 95% interval lies
  inside (−0.3, 0.3).
- **Rule**: *confirms* if D ≥ 0.3, D's lower bound > 0 and I's lower bound > 0; *refutes* if
  D's upper bound < 0.3; *inconclusive* otherwise.

Nothing is computed until every run of the preset has ended: the script refuses, naming
the runs not in the export. A run that diverged or failed is listed and left out of the
fits (never replaced), as the pre-registration says.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from capscale.analysis.trajectories import _slope_difference
from capscale.sweep.spec import load_spec

GAP = 0.3  # the pre-registered size of a gap worth confirming
CONFIDENCE = 0.95
OPTIMIZERS = ("adamw", "muon")  # the contrast is Muon − AdamW


class Incomplete(ValueError):
    """Some run of the preset has not ended: no result is read."""


def run_points(root: Path, preset: str) -> tuple[pd.DataFrame, list[str]]:
    """One point per finished run (optimizer, depth, width, seed, rank) and the runs left out.

    Refuses (``Incomplete``) unless every run the preset plans is in ``root/runs`` with an
    ended status; a ``diverged`` or ``failed`` run is returned in the second list.
    """
    expected = sorted(load_spec(preset).runs())
    missing, left_out, rows = [], [], []
    for name in expected:
        run = root / "runs" / name
        try:
            status = json.loads((run / "status.json").read_text())["status"]
        except (OSError, ValueError, KeyError):
            missing.append(name)
            continue
        if status in ("diverged", "failed"):
            left_out.append(f"{name} ({status})")
            continue
        if status != "done":
            missing.append(name)
            continue
        rows.append({"run": name, **_final_point(run)})
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise Incomplete(f"{preset}: {len(missing)} of {len(expected)} runs have not ended: {shown}")
    return pd.DataFrame(rows), left_out


def _final_point(run: Path) -> dict:
    """The run's final measurement: median over layers of the post-activation, all-token hard rank."""
    cfg = json.loads((run / "config.json").read_text())
    spectra = pd.read_parquet(run / "spectra.parquet", columns=["step", "layer", "site", "bucket", "hard_rank"])
    rows = spectra[(spectra["site"] == "post") & (spectra["bucket"] == "all")]
    last = int(rows["step"].max())
    steps, window = int(cfg["train"]["steps"]), int(cfg["telemetry"]["window"])
    if last + window < steps:  # the pre-registered point is the window of the run's last steps
        raise ValueError(f"{run.name}: its last measurement starts at step {last}, not in its last {window} steps")
    final = rows[rows["step"] == last]
    layers = int(cfg["model"]["n_layer"])
    if final["layer"].nunique() != layers:
        raise ValueError(f"{run.name}: step {last} holds {final['layer'].nunique()} of {layers} layers")
    return {
        "optimizer": cfg["optimizer"]["name"],
        "depth": layers,
        "width": int(cfg["model"]["ffn_width"]),
        "seed": int(cfg["train"]["seed"]),
        "rank": float(final["hard_rank"].median()),
    }


def primary(points: pd.DataFrame, depth: int = 6) -> dict:
    """D: Muon − AdamW slope difference at ``depth`` with its t-interval (n − 4 degrees of freedom)."""
    a = points[(points["optimizer"] == "muon") & (points["depth"] == depth)]
    b = points[(points["optimizer"] == "adamw") & (points["depth"] == depth)]
    out = _slope_difference(a["width"], a["rank"], b["width"], b["rank"], CONFIDENCE)
    return {"D": out["dbeta"], "low": out["dbeta_low"], "high": out["dbeta_high"], "n": len(a) + len(b)}


def cell_contrast(points: pd.DataFrame, factor: str, high, low) -> dict:
    """(β_Muon,high − β_AdamW,high) − (β_Muon,low − β_AdamW,low) from one fit, one residual variance.

    ``points`` holds the four cells (optimizer × ``factor`` ∈ {high, low}); each cell has its
    own intercept and slope in log R on log w; the t-interval has n − 8 degrees of freedom.
    """
    cells = [(o, lv) for lv in (high, low) for o in OPTIMIZERS]
    sign = {("muon", high): 1.0, ("adamw", high): -1.0, ("muon", low): -1.0, ("adamw", low): 1.0}
    x = np.log(points["width"].to_numpy(float))
    y = np.log(points["rank"].to_numpy(float))
    columns, contrast = [], []
    for o, lv in cells:
        g = ((points["optimizer"] == o) & (points[factor] == lv)).to_numpy(float)
        if g.sum() == 0 or len(set(x[g > 0])) < 2:
            raise ValueError(f"cell {o} {factor}={lv} has fewer than 2 widths")
        columns += [g, g * x]
        contrast += [0.0, sign[(o, lv)]]
    design, c = np.column_stack(columns), np.asarray(contrast)
    if design[:, 0::2].sum(axis=1).min() == 0:  # a point in none of the four cells
        raise ValueError("every point must belong to one of the four cells")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(y) - design.shape[1]
    est = float(c @ coef)
    if dof < 1:
        return {"I": est, "low": math.nan, "high": math.nan, "dof": dof}
    resid = y - design @ coef
    var = (resid @ resid / dof) * float(c @ np.linalg.inv(design.T @ design) @ c)
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, dof) * math.sqrt(max(var, 0.0))
    return {"I": est, "low": est - half, "high": est + half, "dof": dof}


def verdict(d: dict, i: dict) -> str:
    """The pre-registered decision rule."""
    if d["D"] >= GAP and d["low"] > 0 and i["low"] > 0:
        return "confirms the paper at this scale"
    if d["high"] < GAP:
        return "refutes the paper at this scale"
    return "inconclusive"


def repetition(main: pd.DataFrame, rep: pd.DataFrame) -> dict:
    """Change of Δβ_hard, repetition arm minus the main depth-6 cells, and whether it stays inside ±0.3."""
    both = pd.concat([main[main["depth"] == 6].assign(arm="main"), rep.assign(arm="rep")], ignore_index=True)
    out = cell_contrast(both, "arm", "rep", "main")
    out["moves"] = not (-GAP < out["low"] and out["high"] < GAP)
    return out


def analyse(root: Path, rep_root: Path | None = None) -> dict:
    points, left_out = run_points(root, "cpu-depth")
    d, i = primary(points), cell_contrast(points, "depth", 6, 2)
    out = {"primary": d, "interaction": i, "verdict": verdict(d, i), "left_out": left_out}
    if rep_root is not None:
        rep, rep_left = run_points(rep_root, "cpu-depth-rep")
        out["repetition"] = repetition(points, rep)
        out["left_out"] += rep_left
    return out


def _iv(r: dict, key: str) -> str:
    return f"{r[key]:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the grid's export (docs/results/cpu-depth)")
    parser.add_argument("--rep", type=Path, help="the repetition arm's export (docs/results/cpu-depth/rep)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        out = analyse(args.root, args.rep)
    except (ValueError, OSError) as exc:
        print(f"cpu_depth_verdict: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    d, i = out["primary"], out["interaction"]
    print(f"D = Δβ_hard (Muon − AdamW, depth 6, post, all tokens): {_iv(d, 'D')} (95%, {d['n']} runs)")
    print(f"I = depth × optimizer interaction: {_iv(i, 'I')} (95%, {i['dof']} degrees of freedom)")
    if "repetition" in out:
        r = out["repetition"]
        moves = "is not excluded" if r["moves"] else "is excluded (inside ±0.3)"
        print(f"repetition arm − main: {_iv(r, 'I')}; an effect of ±0.3 {moves}")
    print(f"left out: {', '.join(out['left_out']) or 'none'}")
    print(f"verdict (pre-registered rule): {out['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
