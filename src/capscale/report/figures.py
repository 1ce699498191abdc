"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Each ``fig_*`` takes an ``Analysis`` and returns a ``Figure`` or None when there is
nothing to draw. ``render_figures`` returns them as PNG bytes, in report order.
Series keep one colour in every figure.
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

from capscale.analysis import ALL_BUCKETS, Analysis
from capscale.report.trajectory import fig_beta_trajectory
from capscale.spectrum import BUCKETS

DPI = 100
BUCKET_COLORS = {"all": "#7f7f7f", "head": "#1f77b4", "mid": "#ff7f0e", "tail": "#d62728"}
REGION_COLORS = {"collapsed": "#d9d9d9", "compact": "#c6dbef", "broad": "#c7e9c0", "brittle": "#fdd0a2"}
_MARKERS = "osD^vP*X<>"


def text(s) -> str:
    """A user string safe for matplotlib: no mathtext ($), not hidden from legends (leading _)."""
    s = str(s).replace("$", r"\$")
    return "\u200b" + s if s.startswith("_") else s


def series_colors(a: Analysis) -> dict[str, tuple]:
    names = sorted(a.sweep.runs["series"].unique())
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(names)}


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


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend is a warning, not a figure
        ax.legend(**kw)


def _site_label(a: Analysis) -> str:
    return f"{a.params.site}-activation"


def _grid(n: int, ncols: int = 3, size=(4.0, 2.8)) -> tuple[Figure, list]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def fig_scaling(a: Analysis) -> Figure:
    """Q1: rank vs width (log-log), seed median with min–max, and the fitted power law per series."""
    colors = series_colors(a)
    spread = a.spread[(a.spread["site"] == a.params.site) & (a.spread["bucket"] == "all")]
    fits = a.fits[(a.fits["site"] == a.params.site) & (a.fits["bucket"] == "all")]
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    for ax, metric, title in zip(fig.subplots(1, 2), ("soft_rank", "hard_rank"), ("soft rank R1", "hard rank R2")):
        widths = np.array(sorted(spread["width"].unique()), dtype=float)
        ax.plot(widths, widths, color="0.6", lw=1, ls=":", label="R = D (all width used)")
        for series, g in spread[spread["metric"] == metric].groupby("series"):
            g = g.sort_values("width")
            err = [g["median"] - g["min"], g["max"] - g["median"]]
            fit = fits[(fits["series"] == series) & (fits["metric"] == metric)].iloc[0]
            label = text(series) + (f"  β={fit['beta']:.2f}" if fit["fittable"] else "  (not fittable)")
            ax.errorbar(g["width"], g["median"], yerr=err, fmt="o", ms=4, capsize=2, color=colors[series], label=label)
            if fit["fittable"]:
                ax.plot(widths, np.exp(fit["intercept"]) * widths ** fit["beta"], color=colors[series], lw=1.2)
        _width_axis(ax)
        _log_y(ax)
        ax.set_xlabel("FFN width D")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs width ({_site_label(a)}, all tokens)")
        _legend(ax, fontsize=7)
    return fig


def fig_matched(a: Analysis) -> Figure:
    """Q2: final validation loss vs width, matched points ringed; β_hard of each matched pair of series."""
    colors = series_colors(a)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for series, g in a.losses.dropna(subset=["val_loss"]).groupby("series"):
        g = g.sort_values("width")
        err = [g["val_loss"] - g["val_loss_min"], g["val_loss_max"] - g["val_loss"]]
        ax.errorbar(
            g["width"],
            g["val_loss"],
            yerr=err,
            fmt="o-",
            ms=4,
            capsize=2,
            lw=1,
            color=colors[series],
            label=text(series),
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
    ax.set_title(f"final validation loss; tolerance {a.params.tolerance:g} nats")
    _legend(ax, fontsize=7)
    pairs = m.drop_duplicates(["series_a", "series_b"]) if len(m) else m
    if len(pairs):
        for i, p in enumerate(pairs.itertuples()):
            for off, side in ((-0.12, "a"), (0.12, "b")):
                s, beta = getattr(p, f"series_{side}"), getattr(p, f"beta_hard_{side}", math.nan)
                lo, hi = getattr(p, f"beta_hard_low_{side}", math.nan), getattr(p, f"beta_hard_high_{side}", math.nan)
                if np.isfinite(beta):
                    bx.errorbar(i + off, beta, yerr=[[beta - lo], [hi - beta]], fmt="o", capsize=3, color=colors[s])
        # one slanted line per pair: stacked "a vs b" labels of long series names overlap
        bx.set_xticks(
            range(len(pairs)),
            [f"{text(p.series_a)} vs {text(p.series_b)}" for p in pairs.itertuples()],
            fontsize=7,
            rotation=25,
            ha="right",
            rotation_mode="anchor",
        )
        bx.set_ylabel("β_hard (95% t-interval)")
        bx.set_title("matched pairs: hard-rank scaling of each series")
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
    return fig


def fig_asymmetry(a: Analysis) -> Figure:
    """Q3a: Δβ per series with interval, and the asymmetry log(R1/R2) against width."""
    colors = series_colors(a)
    b = a.betas[(a.betas["site"] == a.params.site) & (a.betas["bucket"] == "all")].sort_values("series")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    y = np.arange(len(b))
    err = np.array([b["delta_beta"] - b["delta_ci_low"], b["delta_ci_high"] - b["delta_beta"]])
    ax.barh(y, b["delta_beta"], xerr=err, color=[colors[s] for s in b["series"]], capsize=3)
    ax.set_yticks(y, [text(s) for s in b["series"]], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Δβ = β_soft − β_hard (95% t-interval)")
    ax.set_title(f"soft–hard asymmetry of scaling ({_site_label(a)})")
    pts = a.points[(a.points["site"] == a.params.site) & (a.points["bucket"] == "all")].merge(
        a.sweep.runs[["run_id", "series", "width"]], on="run_id"
    )
    pts = pts.assign(asym=np.log(pts["soft_rank"] / pts["hard_rank"]))
    for series, g in pts.groupby("series"):
        med = g.groupby("width")["asym"].median()
        bx.plot(med.index, med.values, "o-", ms=4, lw=1, color=colors[series], label=text(series))
    _width_axis(bx)
    bx.set_xlabel("FFN width D")
    bx.set_ylabel("asymmetry log(R1/R2)")
    bx.set_title("asymmetry grows with width when Δβ > 0")
    _legend(bx, fontsize=7)
    return fig


def fig_phase(a: Analysis) -> Figure:
    """Q3b: the phase map (R1/D, R2/D), log axes, regions shaded, R2 > R1 hatched as impossible."""
    colors = series_colors(a)
    t = a.params.phase
    ph = a.phase.dropna(subset=["soft_frac", "hard_frac"])
    ph = ph[(ph["soft_frac"] > 0) & (ph["hard_frac"] > 0)]
    lo = min(1e-2, float(ph["hard_frac"].min()) / 2 if len(ph) else 1e-2, t.collapsed_soft / 2)
    xs = np.logspace(np.log10(lo), 0, 300)
    fig = Figure(figsize=(7.5, 6), layout="constrained")
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
    labels = {
        "impossible\n(R2 > R1)": (math.sqrt(lo), 0.5),
        "collapsed": (x_collapsed, max(lo * 1.2, x_collapsed / 3)),
        "brittle": (math.sqrt(t.collapsed_soft), lo * 1.5),
        "compact": (math.sqrt(t.collapsed_soft * t.broad_soft), None),
        "broad": (math.sqrt(t.broad_soft), None),
    }
    for name, (x, y) in labels.items():
        if y is None:  # between the brittle diagonal and R2 = R1, on a log scale
            y = x * math.sqrt(t.brittle_ratio)
        ax.text(x, y, name, ha="center", va="center", fontsize=9, color="0.25", style="italic")
    for series, g in ph.groupby("series"):
        ax.scatter(
            g["soft_frac"],
            g["hard_frac"],
            s=18 + 10 * np.log2(g["width"] / g["width"].min() + 1),
            color=colors[series],
            edgecolors="k",
            lw=0.4,
            label=text(series),
            zorder=3,
        )
    ax.plot(xs, xs, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("soft rank / width  (R1/D)")
    ax.set_ylabel("hard rank / width  (R2/D)")
    ax.set_title(f"phase map ({_site_label(a)}, all tokens; marker size ~ width)")
    _legend(ax, fontsize=7, loc="upper left")  # over the impossible region, where no run should be
    return fig


def fig_regimes(a: Analysis) -> Figure | None:
    """Q4a: β by token regime (all/HEAD/MID/TAIL) per series, soft and hard, with t-intervals."""
    b = a.betas[a.betas["site"] == a.params.site]
    series = sorted(b["series"].unique())
    if not b[b["bucket"].isin(BUCKETS)]["soft_fittable"].any():
        return None  # no per-regime telemetry (or nothing fittable): the β table says so
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 2), ("soft", "hard")):
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
        ax.set_xticks(np.arange(len(series)), [text(s) for s in series], rotation=25, ha="right", fontsize=8)
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set_ylabel(f"β_{kind} (95% t-interval)")
        ax.set_title(f"{kind}-rank scaling by token regime ({_site_label(a)})")
        _legend(ax, fontsize=7, ncols=4)
    return fig


def fig_bucket_loss(a: Analysis) -> Figure | None:
    """Q4b: per-bucket final validation loss (top) beside per-bucket hard rank (bottom), against width."""
    colors = series_colors(a)
    med = a.buckets.groupby(["series", "bucket", "width"])[["val_loss", "hard_rank"]].median().reset_index()
    if med[["val_loss", "hard_rank"]].isna().all().all():
        return None  # neither per-bucket validation loss nor per-bucket spectra were logged
    fig = Figure(figsize=(12, 6.4), layout="constrained")
    axes = fig.subplots(2, len(BUCKETS), squeeze=False)
    for j, bucket in enumerate(BUCKETS):
        for series, g in med[med["bucket"] == bucket].groupby("series"):
            axes[0, j].plot(g["width"], g["val_loss"], "o-", ms=3, lw=1, color=colors[series], label=text(series))
            axes[1, j].plot(g["width"], g["hard_rank"], "o-", ms=3, lw=1, color=colors[series])
        axes[0, j].set_title(f"{bucket.upper()} tokens")
        axes[0, j].set_ylabel("final val loss (nats)")
        axes[1, j].set_ylabel("hard rank R2")
        _log_y(axes[1, j])
        for i in range(2):
            _width_axis(axes[i, j])
            axes[i, j].set_xlabel("FFN width D")
    _legend(axes[0, 0], fontsize=7)
    return fig


def fig_opt_arch(a: Analysis) -> Figure:
    """Q5: each series in the (β_soft, β_hard) plane: colour = optimizer setting, marker = architecture."""
    cells = a.cells
    settings = sorted(cells["setting"].unique())
    archs = sorted(cells["arch"].unique())
    cmap = matplotlib.colormaps["tab10" if len(settings) <= 10 else "tab20"]
    fig = Figure(figsize=(7.5, 5.6), layout="constrained")
    ax = fig.subplots()
    for r in cells.itertuples():
        if not (r.soft_fittable and r.hard_fittable):
            continue
        ax.errorbar(
            r.soft_beta,
            r.hard_beta,
            xerr=[[r.soft_beta - r.soft_ci_low], [r.soft_ci_high - r.soft_beta]],
            yerr=[[r.hard_beta - r.hard_ci_low], [r.hard_ci_high - r.hard_beta]],
            fmt=_MARKERS[archs.index(r.arch) % len(_MARKERS)],
            ms=7,
            capsize=2,
            color=cmap(settings.index(r.setting) % cmap.N),
            label=text(r.series),
        )
    lim = ax.get_xlim()[0], ax.get_xlim()[1]
    ax.plot(lim, lim, color="0.5", lw=0.8, ls=":", label="β_hard = β_soft (Δβ = 0)")
    ax.set_xlabel("β_soft (95% t-interval)")
    ax.set_ylabel("β_hard (95% t-interval)")
    ax.set_title(f"optimizer × architecture ({_site_label(a)}, all tokens)")
    _legend(ax, fontsize=7)
    return fig


def _per_series(a: Analysis, frame: pd.DataFrame, draw, ylabel: str, title: str, logy: bool = False) -> Figure:
    color = _width_color(a)
    series = sorted(frame["series"].unique())
    fig, axes = _grid(len(series))
    for ax, s in zip(axes, series):
        for (width, seed), g in frame[frame["series"] == s].groupby(["width", "seed"]):
            draw(ax, g.sort_values("step"), color(width), f"D={width}" if seed == frame["seed"].min() else None)
        ax.set_title(text(s), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            _log_y(ax)
    _legend(axes[0], fontsize=6)
    fig.suptitle(title)
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

    return _per_series(
        a, curves, draw, "loss (nats)", "loss curves: training (lines), validation (dots); colour = width"
    )


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
        f"rank trajectories ({_site_label(a)}, all tokens; median over "
        "layers): R1/D solid, R2/D dashed; colour = width",
        logy=True,
    )


# name → (drawer, caption); the report shows them in this order, each in its question's section
FIGURES: dict[str, tuple[Callable[[Analysis], Figure | None], str]] = {
    "scaling": (fig_scaling, "Rank vs FFN width (log-log) with the fitted power law per series."),
    "matched_loss": (fig_matched, "Final validation loss vs width; matched pairs ringed, with their β_hard."),
    "asymmetry": (fig_asymmetry, "Δβ = β_soft − β_hard per series, and log(R1/R2) against width."),
    "phase_map": (fig_phase, "Phase map: each run at (R1/D, R2/D), regions by the stated thresholds."),
    "regimes": (fig_regimes, "β by token-frequency regime (HEAD / MID / TAIL, and all tokens)."),
    "bucket_loss": (fig_bucket_loss, "Per-bucket final validation loss beside per-bucket hard rank."),
    "optimizer_architecture": (fig_opt_arch, "Each series in the (β_soft, β_hard) plane."),
    "loss_curves": (fig_loss_curves, "Loss curves per run."),
    "rank_trajectories": (fig_trajectories, "Rank per unit width over training."),
    "beta_trajectory": (fig_beta_trajectory, "β_soft and β_hard over training per series, with interval bands."),
}


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def render_figures(a: Analysis) -> dict[str, bytes]:
    """Every figure that has something to show, as PNG bytes, by name (in ``FIGURES`` order)."""
    out = {}
    for name, (draw, _) in FIGURES.items():
        fig = draw(a)
        if fig is not None:
            out[name] = png(fig)
    return out
