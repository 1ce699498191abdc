"""``capscale law ROOT``: the capacity-aware scaling law of a sweep, validated on held-out cells.

Prints, per capacity variable, the joint fit (exponents per optimizer label and their
differences, seed-clustered intervals), the held-out errors against the spread between
seeds, the loss law on the same runs, and the law's prediction at the paper's 160M shape
(an extrapolation). ``--out DIR`` also writes every table as CSV. The method:
``capscale.analysis.law``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

SITES = ("pre", "post")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="a sweep directory, a run directory, or a tree of runs")
    parser.add_argument("--site", choices=SITES, default="post", help="measured site (default: post)")
    parser.add_argument("--last-k", type=int, default=5, help="logged steps per layer in the aggregate (default 5)")
    parser.add_argument(
        "--cluster",
        choices=("seed", "cell", "none"),
        default="seed",
        help="clusters of the robust intervals (default: seed; cell: seeds of one design cell)",
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--out", metavar="DIR", default=None, help="also write the tables as CSV files")


def run(args: argparse.Namespace) -> int:
    from capscale.analysis import load_sweep
    from capscale.analysis.law import capacity_law

    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.last_k < 1:
        raise ValueError(f"--last-k must be >= 1, got {args.last_k}")
    sweep = load_sweep(args.root)
    cluster = None if args.cluster == "none" else args.cluster
    law = capacity_law(sweep, args.last_k, args.site, cluster, args.confidence)
    print(format_law(law, args.confidence, len(sweep.excluded)))
    if args.out:
        write_tables(law, Path(args.out))
        print(f"\ntables: {args.out}")
    return 0


def _num(v, digits=3) -> str:
    return "—" if pd.isna(v) else f"{v:.{digits}f}"


def _ci(lo, hi, digits=3) -> str:
    return f"[{_num(lo, digits)}, {_num(hi, digits)}]"


def format_law(law, confidence: float = 0.95, n_excluded: int = 0) -> str:
    first = next(iter(law.fits.values()))
    lines = [
        f"capacity law: {len(law.table)} runs"
        + (f" ({n_excluded} excluded)" if n_excluded else "")
        + f"; factors {', '.join(first.factors)} (log, centred); "
        + f"{confidence:.0%} intervals "
        + (
            f"clustered by {first.cluster} (G = {first.n_clusters}, t with {first.df} df)"
            if first.cluster
            else f"plain OLS ({first.df} df)"
        ),
    ]
    if law.fixed:
        held = ", ".join(f"{k} = {v:g}" for k, v in law.fixed.items())
        lines.append(f"held fixed in the data (the law cannot see them): {held}")
    for f, partner in first.aliased.items():
        lines.append(
            f"{f} varies together with {partner} in the data: not separable, left out of the fit "
            f"({partner}'s exponent carries both)"
        )
    for name, fit in law.fits.items():
        lines.append("")
        lines.append(f"{name}: R² {fit.r2:.3f}, n {fit.n}, residual sd {fit.resid_sd:.3f} (fitted units)")
        header = f"  {'':<16}" + "".join(f"{t:>26}" for t in ("intercept", *fit.factors))
        lines.append(header)
        for label, g in pd.concat([fit.coef, fit.contrasts]).groupby("label", sort=False):
            cells = [f"{_num(r.estimate)} {_ci(r.ci_low, r.ci_high)}" for r in g.itertuples()]
            lines.append(f"  {label:<16}" + "".join(f"{c:>26}" for c in cells))
    lines.append("")
    lines.append("held-out validation (leave one cell out; errors in the fitted units, log rank or asymmetry):")
    h = law.held_out_summary
    lines.append(
        f"  {'variable':<16}{'label':<10}{'cells':>6}{'RMS error':>11}{'RMS seed sd':>13}{'ratio':>7}{'within seeds':>14}"
    )
    for r in h.itertuples():
        lines.append(
            f"  {r.variable:<16}{r.label:<10}{r.cells:>6}{_num(r.rms_error):>11}{_num(r.rms_seed_sd):>13}"
            f"{_num(r.ratio, 2):>7}{r.within_seeds:>14.0%}"
        )
    lines.append("")
    lines.append("loss law (final validation loss; N = non-embedding parameters, D = tokens):")
    for r in law.loss.itertuples():
        lines.append(
            f"  {r.label}: log L = c + α log N + γ log D: α {_num(r.alpha_n)} {_ci(r.alpha_n_low, r.alpha_n_high)},"
            f" γ {_num(r.gamma_d)} {_ci(r.gamma_d_low, r.gamma_d_high)} (seed-clustered)"
        )
        chin = (
            f"E {_num(r.E)} {_ci(r.E_low, r.E_high)}, a {_num(r.a)} {_ci(r.a_low, r.a_high)}, "
            f"b {_num(r.b)} {_ci(r.b_low, r.b_high)}"
        )
        lines.append(
            f"  {r.label}: L = E + A N^-a + B D^-b: {chin} (asymptotic)"
            + ("" if r.identified else f" — NOT identified ({r.why}): read the log-linear fit")
        )
    lines.append("")
    lines.append(_format_paper(law))
    return "\n".join(lines)


def _format_paper(law) -> str:
    p = law.paper
    x = p["extrapolation"].max()
    lines = [
        f"EXTRAPOLATION to the paper's 160M shape (up to {x:.0f}× beyond the data's range; the interval is "
        "the law's coefficients only, not the error of its form):"
    ]
    wide = p.pivot_table(index=["label", "ffn"], columns="variable", values=["value", "ci_low", "ci_high"])
    names = list(dict.fromkeys(p["variable"]))
    lines.append(f"  {'label':<8}{'ffn':>6}" + "".join(f"{n:>28}" for n in names))
    for (label, ffn), r in wide.iterrows():
        cells = []
        for n in names:
            v, lo, hi = r[("value", n)], r[("ci_low", n)], r[("ci_high", n)]
            flag = "!" if n != "asymmetry" and v > ffn else " "
            digits = 2 if n == "asymmetry" else 0
            cells.append(f"{_num(v, digits)}{flag}{_ci(lo, hi, digits)}")
        lines.append(f"  {label:<8}{int(ffn):>6}" + "".join(f"{c:>28}" for c in cells))
    lines.append("  ! = above the FFN width, impossible for a rank: the law does not hold that far out")
    return "\n".join(lines)


def write_tables(law, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    law.table.to_csv(out / "law_runs.csv", index=False)
    pd.concat([f.coef.assign(variable=n) for n, f in law.fits.items()]).to_csv(out / "law_coef.csv", index=False)
    pd.concat([f.contrasts.assign(variable=n) for n, f in law.fits.items()]).to_csv(
        out / "law_contrasts.csv", index=False
    )
    pd.concat([c.assign(variable=n) for n, c in law.held_out.items()]).to_csv(out / "law_held_out.csv", index=False)
    law.held_out_summary.to_csv(out / "law_held_out_summary.csv", index=False)
    law.loss.to_csv(out / "law_loss.csv", index=False)
    law.paper.to_csv(out / "law_paper_160m.csv", index=False)
