"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Each ``fig_*`` takes an ``Analysis`` and returns a ``Figure`` or None when there is
nothing to draw. ``render_figures`` returns them as PNG bytes, in report order.
Every series keeps one colour and one marker in every figure (``series_style``); labels
drop the fields all series share, which the figure states once (``short_labels``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from capscale.analysis import ALL_BUCKETS, Analysis
from capscale.spectrum import BUCKETS

DPI = 150  # sharp on HiDPI screens
BUCKET_COLORS = {"all": "#7f7f7f", "head": "#1f77b4", "mid": "#ff7f0e", "tail": "#d62728"}
REGION_COLORS = {"collapsed": "#d9d9d9", "compact": "#c6dbef", "broad": "#c7e9c0", "brittle": "#fdd0a2"}
_MARKERS = "osD^vP*X<>"
_BETA_NAMES = {"soft_rank": "β_soft", "hard_rank": "β_hard"}


def text(s) -> str:
    """A user string safe for matplotlib: no mathtext ($), not hidden from legends (leading _)."""
    s = str(s).replace("$", r"\$")
    return "\u200b" + s if s.startswith("_") else s


def series_colors(a: Analysis) -> dict[str, tuple]:
    names = sorted(a.sweep.runs["series"].unique())
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(names)}


def series_markers(a: Analysis) -> dict[str, str]:
    names = sorted(a.sweep.runs["series"].unique())
    return {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(names)}


def short_labels(series) -> tuple[dict[str, str], str]:
    """(series → label without the ' · '-separated fields every series shares, those fields joined)."""
    names = sorted(set(series))
    parts = {s: s.split(" · ") for s in names}
    common = set.intersection(*(set(p[1:]) for p in parts.values())) if len(names) > 1 else set()
    labels = {s: " · ".join([p[0], *(x for x in p[1:] if x not in common)]) for s, p in parts.items()}
    shared = [x for x in parts[names[0]][1:] if x in common] if names else []
    return labels, ", ".join(shared)


def _labels(a: Analysis) -> dict[str, str]:
    return {s: text(v) for s, v in short_labels(a.sweep.runs["series"])[0].items()}


def _shared(a: Analysis) -> str:
    """What every series shares, for a figure's title: '' or '; pos=rope'."""
    common = short_labels(a.sweep.runs["series"])[1]
    return f"; {text(common)}" if common else ""


def _width_color(a: Analysis) -> Callable[[float], tuple]:
    widths = np.log2(a.sweep.runs["width"].astype(float))
    lo, hi = widths.min(), widths.max()
    cmap = matplotlib.colormaps["viridis"]
    return lambda w: cmap(0.85 * ((math.log2(w) - lo) / (hi - lo) if hi > lo else 0.5))


def _width_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def _log_y(ax) -> None:
    """Log y axis labelled in plain numbers at 1-2-5 steps (no 6×10⁻¹ clutter); linear if nothing is plotted."""
    top = ax.dataLim.y1
    if not (np.isfinite(top) and top > 0):  # only NaN drawn (e.g. undersampled ranks): log scale impossible
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _legend(ax, outside: bool = False, **kw) -> None:
    """A legend; ``outside``: below the axes, in two columns, where it covers no data (many series)."""
    if ax.get_legend_handles_labels()[0]:  # an empty legend is a warning, not a figure
        if outside:
            kw = {**kw, "loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncols": 2, "frameon": False}
        ax.legend(**kw)


def _many(a: Analysis) -> bool:
    return a.sweep.runs["series"].nunique() > 3


def _fit_band(x: np.ndarray, y: np.ndarray, grid: np.ndarray, confidence: float):
    """OLS of y on x (logs) and the confidence band of the fitted mean at ``grid``, as in fit_power_law."""
    n = len(x)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    s = math.sqrt(float(resid @ resid) / (n - 2)) if n > 2 else math.nan
    sxx = float(((x - x.mean()) ** 2).sum())
    half = stats.t.ppf(0.5 + confidence / 2, n - 2) * s * np.sqrt(1 / n + (grid - x.mean()) ** 2 / sxx)
    mid = intercept + slope * grid
    return mid - half, mid + half


def _site_label(a: Analysis) -> str:
    return f"{a.params.site}-activation"


def _grid(n: int, ncols: int = 3, size=(4.0, 2.8), min_width: float = 0.0) -> tuple[Figure, list]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(max(size[0] * ncols, min_width), size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _cells(a: Analysis) -> list[str]:
    return sorted(a.sweep.runs["cell"].unique()) if "cell" in a.sweep.runs.columns else []


def _treatment_styles(a: Analysis) -> tuple[dict, dict]:
    names = sorted(a.sweep.runs["treatment"].unique())
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return (
        {t: cmap(i % cmap.N) for i, t in enumerate(names)},
        {t: _MARKERS[i % len(_MARKERS)] for i, t in enumerate(names)},
    )


def _figure_legend(fig: Figure, axes: list, ncols: int | None = None) -> None:
    """One legend for the whole figure, below the panels: one entry per label, whatever the panel."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="outside lower center",
            ncols=ncols or min(len(seen), 4),
            fontsize=8,
            frameon=False,
        )


def fig_scaling_cells(a: Analysis) -> Figure:
    """Q1 for a design with several cells: one panel per cell × rank (R1, R2), a colour per optimizer,
    one figure-level legend; β with its interval is in the tables, not in the legend."""
    colors, markers = _treatment_styles(a)
    site = a.params.site
    spread = a.spread[(a.spread["site"] == site) & (a.spread["bucket"] == "all")]
    fits = a.fits[(a.fits["site"] == site) & (a.fits["bucket"] == "all")]
    info = a.sweep.runs.drop_duplicates("series").set_index("series")[["treatment", "cell"]]
    cells = _cells(a)
    panels = [(c, m) for c in cells for m in ("soft_rank", "hard_rank")]
    fig, axes = _grid(len(panels), ncols=4, size=(3.2, 2.7), min_width=10.8)
    fig.suptitle(f"Rank vs FFN width per cell ({_site_label(a)}, all tokens); lines: fitted power law")
    for ax, (cell, metric) in zip(axes, panels):
        sub = spread[(spread["metric"] == metric) & spread["series"].map(info["cell"]).eq(cell)]
        for series, g in sub.groupby("series"):
            t = info.at[series, "treatment"]
            g = g.sort_values("width")
            err = [g["median"] - g["min"], g["max"] - g["median"]]
            ax.errorbar(
                g["width"], g["median"], yerr=err, fmt=markers[t], ms=3, capsize=2, color=colors[t], label=text(t)
            )
            fit = fits[(fits["series"] == series) & (fits["metric"] == metric)]
            if len(fit) and fit.iloc[0]["fittable"]:
                f = fit.iloc[0]
                grid = np.geomspace(g["width"].min(), g["width"].max(), 20)
                ax.plot(grid, np.exp(f["intercept"]) * grid ** f["beta"], color=colors[t], lw=1)
        _width_axis(ax)
        _log_y(ax)
        ax.set_title(f"{text(cell)}: {'R1' if metric == 'soft_rank' else 'R2'}", fontsize=8)
        ax.tick_params(labelsize=7)
    _figure_legend(fig, axes)
    return fig


def fig_scaling(a: Analysis) -> Figure:
    """Q1: rank vs width (log-log), seed median with min–max, the fitted power law and its confidence band."""
    if len(_cells(a)) > 1:
        return fig_scaling_cells(a)
    colors, markers, labels = series_colors(a), series_markers(a), _labels(a)
    site, conf = a.params.site, a.params.confidence
    spread = a.spread[(a.spread["site"] == site) & (a.spread["bucket"] == "all")]
    fits = a.fits[(a.fits["site"] == site) & (a.fits["bucket"] == "all")]
    pts = a.points[(a.points["site"] == site) & (a.points["bucket"] == "all")].merge(
        a.sweep.runs[["run_id", "series", "width"]], on="run_id"
    )
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    fig.suptitle(f"Rank vs FFN width ({_site_label(a)}, all tokens{_shared(a)}); bands: {conf:.0%} CI of the fit")
    for ax, metric, title in zip(fig.subplots(1, 2), ("soft_rank", "hard_rank"), ("soft rank R1", "hard rank R2")):
        widths = np.array(sorted(spread["width"].unique()), dtype=float)
        grid = np.geomspace(widths.min(), widths.max(), 50) if len(widths) else widths
        ax.plot(widths, widths, color="0.6", lw=1, ls=":", label="R = D (all width used)")
        for series, g in spread[spread["metric"] == metric].groupby("series"):
            g = g.sort_values("width")
            err = [g["median"] - g["min"], g["max"] - g["median"]]
            fit = fits[(fits["series"] == series) & (fits["metric"] == metric)].iloc[0]
            label = labels[series] + (
                f"  β={fit['beta']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
                if fit["fittable"]
                else "  (not fittable)"
            )
            c = colors[series]
            ax.errorbar(g["width"], g["median"], yerr=err, fmt=markers[series], ms=4, capsize=2, color=c, label=label)
            if fit["fittable"]:
                ax.plot(grid, np.exp(fit["intercept"]) * grid ** fit["beta"], color=c, lw=1.2)
                p = pts[(pts["series"] == series) & np.isfinite(pts[metric]) & (pts[metric] > 0)]
                if len(p) > 2:
                    lo, hi = _fit_band(np.log(p["width"]), np.log(p[metric]), np.log(grid), conf)
                    ax.fill_between(grid, np.exp(lo), np.exp(hi), color=c, alpha=0.15, lw=0)
        _width_axis(ax)
        _log_y(ax)
        ax.set_xlabel("FFN width D")
        ax.set_ylabel(title)
        ax.set_title(title)
        _legend(ax, fontsize=7, outside=_many(a))
    return fig


def fig_levels(a: Analysis) -> Figure | None:
    """Q1b: each series' rank over a reference series', width by width, with the pair's geometric-mean ratio
    and its interval (a band). Reference: the series labelled adamw on each architecture, else the lowest."""
    lv = a.levels[a.levels["bucket"] == "all"] if len(a.levels) else a.levels
    if not len(lv):
        return None
    if len(_cells(a)) > 1:
        return fig_levels_cells(a, lv)
    colors, markers, labels = series_colors(a), series_markers(a), _labels(a)
    pts = a.points[(a.points["site"] == a.params.site) & (a.points["bucket"] == "all")].merge(
        a.sweep.runs[["run_id", "series", "arch", "label", "steps", "width"]], on="run_id"
    )
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    fig.suptitle(
        f"Rank of each series over a reference's, width by width ({_site_label(a)}, all tokens{_shared(a)}); "
        f"band: {a.params.confidence:.0%} CI of the geometric mean"
    )
    for ax, metric, title in zip(fig.subplots(1, 2), ("soft_rank", "hard_rank"), ("R1", "R2")):
        refs = []
        for _, g in pts.groupby("arch"):
            ok = g[np.isfinite(g[metric]) & (g[metric] > 0)]
            logs = ok.assign(log=np.log(ok[metric])).groupby(["series", "width"])["log"].mean()
            names = sorted(ok["series"].unique())
            adamw = [s for s in names if (ok[ok["series"] == s]["label"] == "adamw").all()]
            steps = ok.groupby("series")["steps"].max()
            ref = min(adamw, key=lambda s: (steps[s], s)) if adamw else min(names, key=lambda s: logs[s].mean())
            refs.append(labels[ref])
            for s in names:
                if s == ref:
                    continue
                ws = sorted(set(logs[s].index) & set(logs[ref].index))
                ratio = np.exp([logs[s][w] - logs[ref][w] for w in ws])
                row = lv[(lv["metric"] == metric) & lv["series"].isin([s, ref]) & lv["baseline"].isin([s, ref])]
                label = labels[s]
                if len(row):
                    r = row.iloc[0]
                    inv = r["series"] == ref  # the row is oriented higher over lower
                    m, lo, hi = (
                        (1 / r["ratio"], 1 / r["ratio_high"], 1 / r["ratio_low"])
                        if inv
                        else (r["ratio"], r["ratio_low"], r["ratio_high"])
                    )
                    label += f"  {m:.2f}× [{lo:.2f}, {hi:.2f}]"
                    if np.isfinite(lo) and np.isfinite(hi):
                        ax.fill_between(ws, lo, hi, color=colors[s], alpha=0.15, lw=0)
                    ax.plot(ws, [m] * len(ws), color=colors[s], lw=1, ls="--")
                ax.plot(ws, ratio, marker=markers[s], ms=5, lw=1, color=colors[s], label=label)
        ax.axhline(1.0, color="k", lw=0.8)  # no difference; linear y: ratios sit near 1-3, where log ticks are bare
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.9), max(hi, 1.1))  # keep 1× (no difference) in view
        _width_axis(ax)
        ax.set_xlabel("FFN width D")
        ax.set_ylabel(f"{title} / reference {title}")
        refs = sorted(set(refs))
        ax.set_title(f"{title} over {refs[0]}" if len(refs) == 1 else f"{title} over each arch.'s reference")
        _legend(ax, fontsize=7, outside=_many(a))
    return fig


def fig_levels_cells(a: Analysis, lv) -> Figure:
    """Q1b for several cells: per cell, each optimizer's hard rank over the cell's reference (AdamW where
    present), width by width, with the geometric-mean ratio and its interval; one figure-level legend."""
    colors, markers = _treatment_styles(a)
    pts = a.points[(a.points["site"] == a.params.site) & (a.points["bucket"] == "all")].merge(
        a.sweep.runs[["run_id", "series", "treatment", "cell", "width"]], on="run_id"
    )
    cells = [c for c in _cells(a) if c in set(lv["cell"])]  # cells with two optimizers or more
    fig, axes = _grid(len(cells), ncols=3, size=(3.6, 2.7), min_width=10.8)
    fig.suptitle(f"Hard rank over the cell's reference optimizer, per width ({_site_label(a)}, all tokens)")
    for ax, cell in zip(axes, cells):
        g = pts[(pts["cell"] == cell) & np.isfinite(pts["hard_rank"]) & (pts["hard_rank"] > 0)]
        logs = g.assign(log=np.log(g["hard_rank"])).groupby(["treatment", "width"])["log"].mean()
        names = sorted(g["treatment"].unique())
        ref = "adamw" if "adamw" in names else (names[0] if names else None)
        for t in names:
            if t == ref:
                continue
            ws = sorted(set(logs[t].index) & set(logs[ref].index))
            ax.plot(
                ws,
                np.exp([logs[t][w] - logs[ref][w] for w in ws]),
                marker=markers[t],
                ms=4,
                lw=1,
                color=colors[t],
                label=f"{text(t)} / {text(ref)}",
            )
            st, sr = (g[g["treatment"] == x]["series"].iloc[0] for x in (t, ref))
            row = lv[(lv["cell"] == cell) & (lv["metric"] == "hard_rank") & lv["series"].isin([st, sr])]
            row = row[row["baseline"].isin([st, sr])]
            if len(row):
                r = row.iloc[0]
                inv = r["series"] == sr  # rows are oriented higher over lower
                m, lo, hi = (
                    (1 / r["ratio"], 1 / r["ratio_high"], 1 / r["ratio_low"])
                    if inv
                    else (r["ratio"], r["ratio_low"], r["ratio_high"])
                )
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.fill_between(ws, lo, hi, color=colors[t], alpha=0.15, lw=0)
                ax.plot(ws, [m] * len(ws), color=colors[t], lw=1, ls="--")
        ax.axhline(1.0, color="k", lw=0.8)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.9), max(hi, 1.1))
        _width_axis(ax)
        ax.set_title(text(cell), fontsize=8)
        ax.tick_params(labelsize=7)
    _figure_legend(fig, axes)
    return fig


def fig_matched(a: Analysis) -> Figure:
    """Q2: final validation loss vs width, matched points ringed; the β differences of each matched pair."""
    colors, markers, labels = series_colors(a), series_markers(a), _labels(a)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    fig.suptitle(f"Matched loss: pairs within {a.params.tolerance:g} nats at a common width{_shared(a)}")
    ax, bx = fig.subplots(1, 2)
    for series, g in a.losses.dropna(subset=["val_loss"]).groupby("series"):
        g = g.sort_values("width")
        err = [g["val_loss"] - g["val_loss_min"], g["val_loss_max"] - g["val_loss"]]
        ax.errorbar(
            g["width"],
            g["val_loss"],
            yerr=err,
            fmt=markers[series] + "-",
            ms=4,
            capsize=2,
            lw=1,
            color=colors[series],
            label=labels[series],
        )
    m = a.matched
    if len(m):
        for side in "ab":
            ax.scatter(
                m["width"],
                m[f"val_loss_{side}"],
                s=110,
                facecolors="none",
                edgecolors="k",
                lw=1,
                label="matched (within tolerance)" if side == "a" else None,
            )
    _width_axis(ax)
    ax.set_xlabel("FFN width D")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("final val loss (seed median, min–max)")
    pairs = m.drop_duplicates(["series_a", "series_b"]) if len(m) else m
    if len(pairs):
        for i, p in enumerate(pairs.itertuples()):
            for off, kind, fmt in ((-0.15, "soft", "s"), (0.15, "hard", "o")):
                d = getattr(p, f"{kind}_diff", math.nan)
                lo, hi = getattr(p, f"{kind}_diff_low", math.nan), getattr(p, f"{kind}_diff_high", math.nan)
                if np.isfinite(d):
                    bx.errorbar(
                        i + off,
                        d,
                        yerr=[[d - lo], [hi - d]],
                        fmt=fmt,
                        capsize=3,
                        color="0.2" if kind == "hard" else "0.55",
                        label=f"β_{kind} B − A" if i == 0 else None,
                    )
        bx.axhline(0, color="k", lw=0.8)
        bx.set_xlim(-0.6, len(pairs) - 0.4)
        bx.set_xticks(
            range(len(pairs)),
            [f"B {labels[p.series_b]}\nA {labels[p.series_a]}" for p in pairs.itertuples()],
            fontsize=7,
            **({"rotation": 20, "ha": "right", "rotation_mode": "anchor"} if len(pairs) > 2 else {}),
        )
        bx.set_ylabel(f"β difference ({a.params.confidence:.0%} CI)")
        bx.set_title("β difference: differs where the CI excludes 0")
    else:
        bx.text(
            0.5,
            0.5,
            "no pair of series matched\nwithin the tolerance",
            ha="center",
            va="center",
            transform=bx.transAxes,
        )
        bx.set_axis_off()
    _figure_legend(fig, [ax, bx])
    return fig


def fig_asymmetry(a: Analysis) -> Figure:
    """Q3a: Δβ per series with interval, and the asymmetry log(R1/R2) against width."""
    colors, markers, labels = series_colors(a), series_markers(a), _labels(a)
    b = a.betas[(a.betas["site"] == a.params.site) & (a.betas["bucket"] == "all")].sort_values("series")
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    fig.suptitle(f"Soft–hard asymmetry ({_site_label(a)}, all tokens{_shared(a)})")
    ax, bx = fig.subplots(1, 2)
    y = np.arange(len(b))
    err = np.array([b["delta_beta"] - b["delta_ci_low"], b["delta_ci_high"] - b["delta_beta"]])
    ax.barh(y, b["delta_beta"], xerr=err, color=[colors[s] for s in b["series"]], capsize=3)
    ax.set_yticks(y, [labels[s] for s in b["series"]], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"Δβ = β_soft − β_hard ({a.params.confidence:.0%} t-interval)")
    ax.set_title("Δβ per series")
    pts = a.points[(a.points["site"] == a.params.site) & (a.points["bucket"] == "all")].merge(
        a.sweep.runs[["run_id", "series", "width"]], on="run_id"
    )
    pts = pts.assign(asym=np.log(pts["soft_rank"] / pts["hard_rank"]))
    for series, g in pts.groupby("series"):
        med = g.groupby("width")["asym"].median()
        bx.plot(med.index, med.values, marker=markers[series], ms=4, lw=1, color=colors[series], label=labels[series])
    _width_axis(bx)
    bx.set_xlabel("FFN width D")
    bx.set_ylabel("asymmetry log(R1/R2)")
    bx.set_title("log(R1/R2) vs width (grows when Δβ > 0)")
    _figure_legend(fig, [bx])
    return fig


def fig_phase(a: Analysis) -> Figure:
    """Q3b: the phase map (R1/D, R2/D), log axes, regions shaded, R2 > R1 hatched as impossible."""
    colors, markers, labels = series_colors(a), series_markers(a), _labels(a)
    t = a.params.phase
    ph = a.phase.dropna(subset=["soft_frac", "hard_frac"])
    ph = ph[(ph["soft_frac"] > 0) & (ph["hard_frac"] > 0)]
    lo = min(1e-2, float(ph["hard_frac"].min()) / 2 if len(ph) else 1e-2, t.collapsed_soft / 2)
    xs = np.logspace(np.log10(lo), 0, 300)
    fig = Figure(figsize=(8.5, 6), layout="constrained")
    ax = fig.subplots()
    ax.fill_between(xs, xs, 1.0, facecolor="none", hatch="///", edgecolor="0.55", lw=0)
    below = np.minimum(t.brittle_ratio * xs, xs)
    ax.fill_between(xs, lo, xs, where=xs < t.collapsed_soft, color=REGION_COLORS["collapsed"], lw=0)
    ax.fill_between(xs, lo, below, where=xs >= t.collapsed_soft, color=REGION_COLORS["brittle"], lw=0)
    ax.fill_between(
        xs, below, xs, where=(xs >= t.collapsed_soft) & (xs < t.broad_soft), color=REGION_COLORS["compact"], lw=0
    )
    ax.fill_between(xs, below, xs, where=xs >= t.broad_soft, color=REGION_COLORS["broad"], lw=0)
    x_collapsed = math.sqrt(lo * t.collapsed_soft)
    regions = {
        "impossible\n(R2 > R1)": (math.sqrt(lo), 0.5),
        "collapsed": (x_collapsed, max(lo * 1.2, x_collapsed / 3)),
        "brittle": (math.sqrt(t.collapsed_soft), lo * 1.5),
        "compact": (math.sqrt(t.collapsed_soft * t.broad_soft), None),
        "broad": (math.sqrt(t.broad_soft), None),
    }
    for name, (x, y) in regions.items():
        if y is None:  # between the brittle diagonal and R2 = R1, on a log scale
            y = x * math.sqrt(t.brittle_ratio)
        ax.text(x, y, name, ha="center", va="center", fontsize=9, color="0.25", style="italic")
    for series, g in ph.groupby("series"):
        ax.scatter(
            g["soft_frac"],
            g["hard_frac"],
            s=18 + 10 * np.log2(g["width"] / g["width"].min() + 1),
            color=colors[series],
            marker=markers[series],
            edgecolors="k",
            lw=0.4,
            label=labels[series],
            zorder=3,
        )
    ax.plot(xs, xs, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("soft rank / width  (R1/D)")
    ax.set_ylabel("hard rank / width  (R2/D)")
    ax.set_title(f"Phase map ({_site_label(a)}, all tokens{_shared(a)}); marker size ~ width")
    if _many(a):
        _legend(ax, fontsize=7, outside=True)
    else:
        _legend(ax, fontsize=7, loc="upper left")  # over the impossible region, where no run should be
    return fig


def fig_regimes(a: Analysis) -> Figure | None:
    """Q4a: β by token regime (all/HEAD/MID/TAIL) per series, soft and hard, with t-intervals."""
    b = a.betas[a.betas["site"] == a.params.site]
    series = sorted(b["series"].unique())
    if not b[b["bucket"].isin(BUCKETS)]["soft_fittable"].any():
        return None  # no per-regime telemetry (or nothing fittable): the β table says so
    labels = _labels(a)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    fig.suptitle(f"β by token regime ({_site_label(a)}{_shared(a)}); bars: {a.params.confidence:.0%} t-interval")
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("soft", "hard")):
        width = 0.8 / len(ALL_BUCKETS)
        for j, bucket in enumerate(ALL_BUCKETS):
            sub = b[b["bucket"] == bucket].set_index("series").reindex(series)
            x = np.arange(len(series)) + (j - (len(ALL_BUCKETS) - 1) / 2) * width
            beta = sub[f"{kind}_beta"].to_numpy(dtype=float)
            err = np.array(
                [
                    beta - sub[f"{kind}_ci_low"].to_numpy(dtype=float),
                    sub[f"{kind}_ci_high"].to_numpy(dtype=float) - beta,
                ]
            )
            ax.bar(x, beta, width, yerr=err, capsize=2, color=BUCKET_COLORS[bucket], label=bucket.upper())
        ax.set_xticks(
            np.arange(len(series)),
            [labels[s] for s in series],
            rotation=25,
            ha="right",
            fontsize=8,
            rotation_mode="anchor",
        )
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set_ylabel(f"β_{kind}")
        ax.set_title(f"β_{kind} by regime")
    _figure_legend(fig, list(axes), ncols=len(ALL_BUCKETS))
    return fig


def fig_bucket_loss(a: Analysis) -> Figure | None:
    """Q4b: per-bucket final validation loss (top) beside per-bucket hard rank (bottom), against width."""
    colors, markers, labels = series_colors(a), series_markers(a), _labels(a)
    med = a.buckets.groupby(["series", "bucket", "width"])[["val_loss", "hard_rank"]].median().reset_index()
    if med[["val_loss", "hard_rank"]].isna().all().all():
        return None  # neither per-bucket validation loss nor per-bucket spectra were logged
    fig = Figure(figsize=(12, 6.4), layout="constrained")
    fig.suptitle(f"Per-regime loss and hard rank ({_site_label(a)}{_shared(a)}; seed medians)")
    axes = fig.subplots(2, len(BUCKETS), squeeze=False)
    for j, bucket in enumerate(BUCKETS):
        for series, g in med[med["bucket"] == bucket].groupby("series"):
            style = {"marker": markers[series], "ms": 3, "lw": 1, "color": colors[series]}
            axes[0, j].plot(g["width"], g["val_loss"], label=labels[series], **style)
            axes[1, j].plot(g["width"], g["hard_rank"], **style)
        axes[0, j].set_title(f"{bucket.upper()} tokens")
        axes[0, j].set_ylabel("final val loss (nats)")
        axes[1, j].set_ylabel("hard rank R2")
        _log_y(axes[1, j])
        for i in range(2):
            _width_axis(axes[i, j])
            axes[i, j].set_xlabel("FFN width D")
    _figure_legend(fig, list(axes[0]))
    return fig


def fig_opt_arch(a: Analysis) -> Figure:
    """Q5: each series in the (β_soft, β_hard) plane, in its colour and marker as in every figure."""
    colors, markers, labels = series_colors(a), series_markers(a), _labels(a)
    fig = Figure(figsize=(8.5, 5.6), layout="constrained")
    ax = fig.subplots()
    for r in a.cells.itertuples():
        if not (r.soft_fittable and r.hard_fittable):
            continue
        ax.errorbar(
            r.soft_beta,
            r.hard_beta,
            xerr=[[r.soft_beta - r.soft_ci_low], [r.soft_ci_high - r.soft_beta]],
            yerr=[[r.hard_beta - r.hard_ci_low], [r.hard_ci_high - r.hard_beta]],
            fmt=markers[r.series],
            ms=7,
            capsize=2,
            color=colors[r.series],
            label=labels[r.series],
        )
    lim = ax.get_xlim()[0], ax.get_xlim()[1]
    ax.plot(lim, lim, color="0.5", lw=0.8, ls=":", label="β_hard = β_soft (Δβ = 0)")
    conf = f"{a.params.confidence:.0%} t-interval"
    ax.set_xlabel(f"β_soft ({conf})")
    ax.set_ylabel(f"β_hard ({conf})")
    ax.set_title(f"Optimizer × architecture ({_site_label(a)}, all tokens{_shared(a)})")
    _legend(ax, fontsize=7, outside=_many(a))
    return fig


def _per_series(a: Analysis, frame: pd.DataFrame, draw, ylabel: str, title: str, logy: bool = False) -> Figure:
    color = _width_color(a)
    series = sorted(frame["series"].unique())
    fig, axes = _grid(len(series))
    for ax, s in zip(axes, series):
        for (width, seed), g in frame[frame["series"] == s].groupby(["width", "seed"]):
            draw(ax, g.sort_values("step"), color(width), f"D={width}" if seed == frame["seed"].min() else None)
        ax.set_title(_labels(a)[s], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            _log_y(ax)
    _figure_legend(fig, axes, ncols=min(len(frame["width"].unique()), 7))
    fig.suptitle(title, fontsize=10)
    return fig


def fig_loss_curves(a: Analysis) -> Figure | None:
    """Training loss (lines) and validation loss (markers) per run, one panel per series."""
    curves = a.curves
    if "loss" not in curves.columns or curves["loss"].notna().sum() == 0:
        return None

    def draw(ax, g, c, label):
        ax.plot(g["step"], g["loss"], color=c, lw=0.9, label=label)
        if "val_loss" in g.columns:
            v = g.dropna(subset=["val_loss"])
            ax.plot(v["step"], v["val_loss"], "o", ms=3, color=c)

    return _per_series(a, curves, draw, "loss (nats)", "Loss: training (lines), validation (dots)")


def fig_trajectories(a: Analysis) -> Figure:
    """Soft (solid) and hard (dashed) rank per unit width over training, median over layers."""
    tr = a.trajectories[(a.trajectories["site"] == a.params.site) & (a.trajectories["bucket"] == "all")]

    def draw(ax, g, c, label):
        ax.plot(g["step"], g["soft_frac"], color=c, lw=1, label=label)
        ax.plot(g["step"], g["hard_frac"], color=c, lw=1, ls="--")

    return _per_series(
        a,
        tr,
        draw,
        "rank / width",
        "Rank / width over training: R1/D solid, R2/D dashed",
        logy=True,
    )


def fig_beta_trajectory(a: Analysis) -> Figure | None:
    """β_soft and β_hard (headline site, all tokens) against tokens seen, with t-interval bands:
    one row per architecture and step budget (the series the report compares), coloured by
    optimizer label."""
    tr = a.beta_trajectory
    if tr.empty:
        return None
    tr = tr[(tr["site"] == a.params.site) & (tr["bucket"] == "all") & tr["fittable"].astype(bool)]
    if tr.empty:
        return None
    info = a.sweep.runs.drop_duplicates("series").set_index("series")
    labels = sorted(info["label"].unique())
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    cells = [
        (arch, steps, sorted(g.index))
        for (arch, steps), g in info[info.index.isin(tr["series"].unique())].groupby(["arch", "steps"], sort=True)
    ]
    fig = Figure(figsize=(10, 1.4 + 2.8 * len(cells)), layout="constrained")
    axes = fig.subplots(len(cells), 2, squeeze=False)
    for row, (arch, steps, series) in zip(axes, cells):
        sel = tr[tr["series"].isin(series)]
        use_tokens = sel["tokens"].notna().all()
        x = "tokens" if use_tokens else "step"
        for ax, metric in zip(row, ("soft_rank", "hard_rank")):
            for name, g in sel[sel["metric"] == metric].groupby("series", sort=True):
                g = g.sort_values("step")
                c = colors[info.at[name, "label"]]
                ax.plot(g[x], g["beta"], color=c, lw=1.2, marker="o", ms=2.5, label=text(info.at[name, "label"]))
                lo, hi = g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                ax.fill_between(g[x].to_numpy(float)[ok], lo[ok], hi[ok], color=c, alpha=0.15, lw=0)
            cell = " · ".join(str(p) for p in (arch, f"{steps} steps") if p not in ("", None))
            ax.set_title(f"{_BETA_NAMES[metric]} ({a.params.site}, all tokens) · {text(cell)}", fontsize=9)
            ax.set_xlabel("tokens seen" if use_tokens else "step", fontsize=8)
            if use_tokens:
                ax.xaxis.set_major_formatter(
                    matplotlib.ticker.EngFormatter(sep="")
                )  # 200k, 1.5M: no overlapping long ticks
            ax.axhline(0, color="#999", lw=0.6)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("β (band: 95% t-interval)" if a.params.confidence == 0.95 else "β (band: t-interval)")
        lo, hi = np.nanpercentile(sel[["beta", "ci_low", "ci_high"]].to_numpy(float), [5, 95])
        for ax in row:  # a 1-dof interval must not flatten the rest
            ax.set_ylim(max(lo, -1.0) - 0.05, min(hi, 2.5) + 0.05)
    _figure_legend(fig, list(axes.ravel()))
    return fig


# name → (drawer, caption); the report shows them in this order, each in its question's section
FIGURES: dict[str, tuple[Callable[[Analysis], Figure | None], str]] = {
    "scaling": (
        fig_scaling,
        "Rank vs FFN width (log-log): seed median with min–max, the fitted power law per series and the "
        "confidence band of the fit; β in the legend with its interval.",
    ),
    "levels": (
        fig_levels,
        "Each series' rank over the reference series' (AdamW where present), width by width; dashed: the "
        "geometric-mean ratio, band: its interval over widths.",
    ),
    "matched_loss": (
        fig_matched,
        "Final validation loss vs width, matched pairs ringed; right: each matched pair's β differences with intervals.",
    ),
    "asymmetry": (fig_asymmetry, "Δβ = β_soft − β_hard per series, and log(R1/R2) against width."),
    "phase_map": (fig_phase, "Phase map: each run at (R1/D, R2/D), regions by the stated thresholds."),
    "regimes": (fig_regimes, "β by token-frequency regime (HEAD / MID / TAIL, and all tokens)."),
    "bucket_loss": (fig_bucket_loss, "Per-bucket final validation loss beside per-bucket hard rank."),
    "optimizer_architecture": (fig_opt_arch, "Each series in the (β_soft, β_hard) plane."),
    "loss_curves": (fig_loss_curves, "Loss curves per run, one panel per series; colour = FFN width."),
    "rank_trajectories": (
        fig_trajectories,
        "Rank per unit width over training (headline site, all tokens, median over layers), one panel per series; "
        "colour = FFN width.",
    ),
    "beta_trajectory": (fig_beta_trajectory, "β_soft and β_hard over training per series, with interval bands."),
}


LAYOUT_KEY = "capscale:layout"  # PNG text chunk: the axes and legends as fractions of the figure


def layout(fig: Figure) -> dict:
    """Visible axes and every legend as [x0, y0, x1, y1] fractions of the figure (after drawing)."""
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    axes = [list(ax.get_position().bounds) for ax in fig.axes if ax.get_visible() and ax.axison]

    def frac(legends) -> list[list[float]]:
        out = []
        for lg in legends:
            e = lg.get_window_extent(renderer)
            out.append([e.x0 / box.width, e.y0 / box.height, e.x1 / box.width, e.y1 / box.height])
        return out

    return {
        "axes": [[x, y, x + w, y + h] for x, y, w, h in axes],
        "legends": frac([ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]),
        "figure_legends": frac(fig.legends),
        "width_in": float(fig.get_figwidth()),
        "height_in": float(fig.get_figheight()),
    }


def read_layout(png_bytes: bytes) -> dict | None:
    """The layout stored in a figure's PNG by ``png`` (None if absent)."""
    import json
    import struct
    import zlib

    pos = 8
    while pos < len(png_bytes):
        (length,) = struct.unpack(">I", png_bytes[pos : pos + 4])
        kind = png_bytes[pos + 4 : pos + 8]
        body = png_bytes[pos + 8 : pos + 8 + length]
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            key, _, rest = body.partition(b"\0")
            if key == LAYOUT_KEY.encode():
                if kind == b"zTXt":
                    rest = zlib.decompress(rest[1:])
                elif kind == b"iTXt":
                    flag, rest = rest[0], rest[2:]
                    rest = rest.split(b"\0", 2)[2]
                    rest = zlib.decompress(rest) if flag else rest
                return json.loads(rest.decode("utf-8"))
        pos += 12 + length
    return None


def png(fig: Figure) -> bytes:
    import json

    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    meta = {LAYOUT_KEY: json.dumps(layout(fig))}
    fig.savefig(buf, format="png", dpi=DPI, metadata=meta)
    return buf.getvalue()


def render_figures(a: Analysis, progress: Callable[[str], None] | None = None) -> dict[str, bytes]:
    """Every figure that has something to show, as PNG bytes, by name (in ``FIGURES`` order)."""
    out = {}
    for i, (name, (draw, _)) in enumerate(FIGURES.items(), start=1):
        if progress is not None:
            progress(f"figure {i}/{len(FIGURES)}: {name}")
        fig = draw(a)
        if fig is not None:
            out[name] = png(fig)
    return out
