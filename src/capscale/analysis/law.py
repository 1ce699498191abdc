"""A capacity-aware scaling law: realized ranks as one joint power law in the design's factors.

Each capacity variable (``CAPACITY_VARIABLES``: soft rank, hard rank, the asymmetry
log(R1/R2), the TAIL tokens' hard rank; one value per run, aggregated by the paper's rule,
``last_k_per_layer`` then ``aggregate_runs``) is fitted by OLS as

    log R = c_o + Σ_f β_{o,f} · log x_f        (asymmetry: log(R1/R2) itself, so β = Δβ)

over every finished run, the factors x_f being those that vary in the data among FFN
width (``ffn``), ``d_model``, depth (``depth``: the layers the run measured) and tokens
seen (``tokens`` = steps × tokens per step). Every optimizer label ``o`` has its own
intercept and exponents (the full optimizer × factor interaction); ``contrasts`` gives each
label's exponents minus the first label's, with their own intervals. Log factors are centred
at the data's geometric means, so ``c_o`` is the log rank at the centre of the design.

**Intervals are clustered by seed** (``cluster="seed"``): the residuals of runs sharing a
seed (its data order and initialisation stream) may be correlated, so the covariance is the
cluster-robust sandwich (CR1: × G/(G−1) · (n−1)/(n−k)) and intervals use a t with G − 1
degrees of freedom. With few clusters that sandwich is itself a noisy, downward-biased
estimate (on planted data with 4 seeds it came out at a quarter of the true standard error),
so every standard error is the larger of the cluster-robust and the classical OLS one
(the rule of thumb of Angrist & Pischke, *Mostly Harmless Econometrics*, ch. 8). With G = 3 seeds the
t has 2 degrees of freedom (4.30 at 95%): wide, and meant to be. A seed-level bootstrap
over 3 seeds has only 10 distinct resamples and under-covers, so it is not used.
``cluster="cell"`` clusters by design cell instead (the seeds of a cell share its deviation
from the law: lack of fit), ``cluster=None`` is plain OLS.

**Held-out validation** (``held_out``): each design cell (label × factor levels) is left out
in turn, the law refitted on the others, and the cell's mean (over its seeds) predicted; the
error is set against the spread between the cell's seeds. A law that describes but does not
predict shows held-out errors well above that spread.

**The loss law** (``loss_law``) on the same runs: final validation loss against
non-embedding parameters N = depth · (4 d² + m · d · ffn) (m = 2 matrices, 3 for a gated
FFN) and tokens D, per label, Chinchilla-style ``L = E + A N^−a + B D^−b`` by
``scipy.optimize.least_squares`` (intervals: asymptotic Wald, from the Jacobian, not
clustered; on planted data they covered 87–93% for a nominal 95%),
and beside it the log-linear ``log L = c + α log N + γ log D`` with seed-clustered
intervals, which is what to read when the data cannot identify the five Chinchilla
parameters (``identified`` says which, and why not).

``extrapolate`` evaluates the law at a target shape (default: the paper's 160M model), with
the mean's interval; far outside the data, and the interval does not include the error of
the law's form, only that of its coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

from capscale.analysis.aggregate import aggregate_runs, last_k_per_layer
from capscale.analysis.runs import Sweep

FACTORS = ("ffn", "d_model", "depth", "tokens")


@dataclass(frozen=True)
class Variable:
    """One capacity variable: ``metric`` of ``bucket``; ``log``: fitted as log(value) (else as is)."""

    name: str
    bucket: str
    metric: str
    log: bool
    description: str


CAPACITY_VARIABLES = (
    Variable("soft_rank", "all", "soft_rank", True, "soft rank R1, all tokens"),
    Variable("hard_rank", "all", "hard_rank", True, "hard rank R2, all tokens"),
    Variable("asymmetry", "all", "asymmetry", False, "log(R1/R2), all tokens: exponents are Δβ"),
    Variable("tail_hard_rank", "tail", "hard_rank", True, "hard rank R2, TAIL tokens"),
)

# The paper's 160M shape: d_model 768, 12 layers, FFN 768·{1..8}, 6,000 steps × 524,288 tokens.
PAPER_160M = {"d_model": 768, "depth": 12, "tokens": 6000 * 524288, "ffn": tuple(768 * k for k in range(1, 9))}


# -- the per-run table ---------------------------------------------------------------


def law_table(sweep: Sweep, last_k: int = 5, site: str = "post", final_fraction: float | None = None) -> pd.DataFrame:
    """One row per run: label, seed, the factors, each capacity variable's value (its response:
    log rank, or the asymmetry), non-embedding parameters and the final validation loss.
    ``last_k``/``final_fraction``: the aggregate of ``last_k_per_layer`` (the report passes its own)."""
    points = aggregate_runs(last_k_per_layer(sweep.spectra, last_k, final_fraction))
    points = points[points["site"] == site]
    if points.empty:
        raise ValueError(f"no spectra at site {site!r}")
    runs = sweep.runs
    tokens_per_step = pd.to_numeric(runs["tokens_per_step"], errors="coerce")
    table = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "label": runs["label"].astype(str),
            "seed": runs["seed"].astype(int),
            "ffn": runs["width"].astype(float),
            "d_model": pd.to_numeric(runs["d_model"], errors="coerce").astype(float),
            # tokens seen; a run that does not say its tokens per step counts steps
            "tokens": runs["steps"].astype(float) * tokens_per_step.fillna(1.0),
            "final_val_loss": runs["final_val_loss"].astype(float),
            "gated": runs["activation"].astype(str).str.contains("glu") if "activation" in runs else False,
        }
    )
    depth = points[points["bucket"] == "all"].set_index("run_id")["n_layers"]
    table["depth"] = table["run_id"].map(depth).astype(float)
    if "n_layer" in runs.columns:  # a sweep that declares its depth: that, not the measured count
        table["depth"] = pd.to_numeric(runs["n_layer"], errors="coerce").fillna(table["depth"]).astype(float)
    ffn_mats = np.where(table["gated"], 3.0, 2.0)
    d = table["d_model"]
    table["params"] = table["depth"] * (4 * d**2 + ffn_mats * d * table["ffn"])
    for var in CAPACITY_VARIABLES:
        sub = points[points["bucket"] == var.bucket].set_index("run_id")
        if var.metric == "asymmetry":
            value = np.log(sub["soft_rank"] / sub["hard_rank"])  # as fits.py's Δβ: from the aggregates
        else:
            value = sub[var.metric]
        value = table["run_id"].map(value).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            table[var.name] = np.log(value) if var.log else value
    return table.drop(columns="gated")


def varying_factors(table: pd.DataFrame) -> tuple[str, ...]:
    """The factors with more than one value in the table (the others cannot be fitted)."""
    return tuple(f for f in FACTORS if table[f].notna().all() and table[f].nunique() > 1)


def aliased_factors(table: pd.DataFrame, factors: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The factors the design separates, and those it does not (``{factor: what it moves with}``).

    A factor whose log is, within every label, an affine function of the factors kept before it
    (in ``FACTORS`` order) adds nothing the fit can tell apart: e.g. a study that gives each
    depth its own token budget varies depth and tokens together, and one exponent carries both.
    It is left out of the fit and named, not silently absorbed.
    """
    labels = tuple(sorted(table["label"].unique()))
    kept: list[str] = []
    aliased: dict[str, str] = {}
    for f in factors:
        trial = [*kept, f]
        center = {g: float(np.log(table[g]).mean()) for g in trial}
        X = _design(table, labels, trial, center)
        if np.linalg.matrix_rank(X) == X.shape[1]:
            kept.append(f)
            continue
        logs = np.log(table[f].to_numpy(float))
        partners = [g for g in kept if abs(np.corrcoef(logs, np.log(table[g].to_numpy(float)))[0, 1]) > 1 - 1e-9]
        aliased[f] = partners[0] if partners else " and ".join(kept)
    return tuple(kept), aliased


# -- one joint fit ------------------------------------------------------------------


@dataclass
class LawFit:
    """One variable's joint fit. ``coef``: one row per label × term (``intercept`` or a factor):
    ``estimate``, ``se``, ``ci_low``, ``ci_high``. ``contrasts``: each label's terms minus the
    reference (first) label's, same columns."""

    variable: str
    labels: tuple[str, ...]
    factors: tuple[str, ...]
    center: dict[str, float]
    coef: pd.DataFrame
    contrasts: pd.DataFrame
    n: int
    n_clusters: int
    df: int
    r2: float
    resid_sd: float
    cluster: str | None
    confidence: float
    beta: np.ndarray = field(repr=False)
    covs: tuple[np.ndarray, ...] = field(repr=False)  # the larger standard error of these is used
    aliased: dict[str, str] = field(default_factory=dict)  # factors varied with another: not separable

    def predict(self, label: str, **levels: float) -> tuple[float, float, float]:
        """The law's mean response at ``levels`` (one value per fitted factor) for ``label``, with its interval."""
        x = self._row(label, levels)
        est = float(x @ self.beta)
        half = _t(self.confidence, self.df) * _se(self.covs, x)
        return est, est - half, est + half

    def _row(self, label: str, levels: dict) -> np.ndarray:
        if label not in self.labels:
            raise ValueError(f"label {label!r} not in the fit ({list(self.labels)})")
        k = 1 + len(self.factors)
        x = np.zeros(k * len(self.labels))
        j = self.labels.index(label) * k
        x[j] = 1.0
        for i, f in enumerate(self.factors):
            x[j + 1 + i] = math.log(float(levels[f])) - self.center[f]
        return x


def _t(confidence: float, df: int) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2, df)) if df > 0 else math.inf


def _design(table: pd.DataFrame, labels, factors, center) -> np.ndarray:
    k = 1 + len(factors)
    X = np.zeros((len(table), k * len(labels)))
    lab = table["label"].to_numpy()
    for o, label in enumerate(labels):
        on = (lab == label).astype(float)
        X[:, o * k] = on
        for i, f in enumerate(factors):
            X[:, o * k + 1 + i] = on * (np.log(table[f].to_numpy(float)) - center[f])
    return X


def ols_clustered(X: np.ndarray, y: np.ndarray, clusters, cluster_robust: bool = True):
    """OLS with a cluster-robust (CR1) covariance over ``clusters``; plain OLS when
    ``cluster_robust`` is False or there is one cluster. Returns (beta, covs, df, residuals, G):
    ``covs`` the covariances to take the larger standard error of (``_se``): the classical one,
    and the cluster-robust one where clustered."""
    n, k = X.shape
    if np.linalg.matrix_rank(X) < k:
        raise ValueError("the design does not identify the law (a factor does not vary within a label)")
    if n <= k:
        raise ValueError(f"{n} points for {k} coefficients")
    xtx_inv = np.linalg.inv(X.T @ X)
    beta = xtx_inv @ (X.T @ y)
    resid = y - X @ beta
    groups = pd.unique(np.asarray(clusters))
    if cluster_robust and len(groups) >= 2:
        meat = np.zeros((k, k))
        cl = np.asarray(clusters)
        for g in groups:
            s = X[cl == g].T @ resid[cl == g]
            meat += np.outer(s, s)
        G = len(groups)
        cov = xtx_inv @ meat @ xtx_inv * (G / (G - 1)) * ((n - 1) / (n - k))
        classical = xtx_inv * float(resid @ resid) / (n - k)
        return beta, (cov, classical), G - 1, resid, G
    cov = xtx_inv * float(resid @ resid) / (n - k)
    return beta, (cov,), n - k, resid, len(groups)


def _se(covs, x: np.ndarray) -> float:
    """Standard error of x·β: the largest over ``covs``."""
    return math.sqrt(max(max(float(x @ c @ x) for c in covs), 0.0))


def fit_law(
    table: pd.DataFrame,
    variable: str,
    factors: tuple[str, ...] | None = None,
    cluster: str | None = "seed",
    confidence: float = 0.95,
) -> LawFit:
    """The joint fit of one variable (a column of ``law_table``) over the runs with a finite value."""
    if cluster not in ("seed", "cell", None):
        raise ValueError(f"cluster must be 'seed', 'cell' or None, got {cluster!r}")
    data = table[np.isfinite(table[variable])]
    labels = tuple(sorted(data["label"].unique()))
    if not labels:
        raise ValueError(f"no run has a finite {variable}")
    aliased: dict[str, str] = {}
    if factors is None:
        factors, aliased = aliased_factors(data, varying_factors(data))
    factors = tuple(factors)
    center = {f: float(np.log(data[f]).mean()) for f in factors}
    X = _design(data, labels, factors, center)
    y = data[variable].to_numpy(float)
    clusters = data["seed"].to_numpy() if cluster == "seed" else _cells(data, factors)
    beta, covs, df, resid, G = ols_clustered(X, y, clusters, cluster_robust=cluster is not None)
    terms = ("intercept", *factors)
    half_t = _t(confidence, df)
    coef_rows, contrast_rows = [], []
    k = len(terms)
    for o, label in enumerate(labels):
        for i, term in enumerate(terms):
            j = o * k + i
            e = np.eye(len(beta))
            coef_rows.append(_interval(label, term, beta[j], _se(covs, e[j]), half_t))
            if o > 0:  # minus the same term of the reference label
                d = e[j] - e[i]
                contrast_rows.append(_interval(f"{label} − {labels[0]}", term, d @ beta, _se(covs, d), half_t))
    tss = float(((y - y.mean()) ** 2).sum())
    n = len(y)
    return LawFit(
        variable=variable,
        labels=labels,
        factors=factors,
        center=center,
        coef=pd.DataFrame(coef_rows),
        contrasts=pd.DataFrame(contrast_rows, columns=["label", "term", "estimate", "se", "ci_low", "ci_high"]),
        n=n,
        n_clusters=G,
        df=df,
        r2=1 - float(resid @ resid) / tss if tss > 0 else math.nan,
        resid_sd=math.sqrt(float(resid @ resid) / max(n - X.shape[1], 1)),
        cluster=cluster,
        confidence=confidence,
        beta=beta,
        covs=covs,
        aliased=aliased,
    )


def _interval(label, term, est, se, half_t) -> dict:
    return {
        "label": label,
        "term": term,
        "estimate": float(est),
        "se": se,
        "ci_low": float(est - half_t * se),
        "ci_high": float(est + half_t * se),
    }


def _cells(table: pd.DataFrame, factors) -> np.ndarray:
    return table[["label", *factors]].astype(str).agg("|".join, axis=1).to_numpy()


# -- held-out validation --------------------------------------------------------------


def held_out(table: pd.DataFrame, variable: str, factors: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Leave each design cell out, refit on the rest, predict the cell's mean response.

    One row per cell: label, its factor levels, ``n_seeds``, ``observed`` (the mean over its
    seeds), ``seed_sd`` (their standard deviation), ``seed_min``/``seed_max``, ``predicted``,
    ``error`` (predicted − observed) and ``within_seeds`` (the prediction inside the seeds'
    range). A cell whose removal leaves the law unidentified gets a NaN prediction.
    """
    data = table[np.isfinite(table[variable])]
    factors = varying_factors(data) if factors is None else tuple(factors)
    keys = ["label", *factors]
    rows = []
    for key, cell in data.groupby(keys, sort=True):
        rest = data.drop(index=cell.index)
        v = cell[variable]
        row = dict(zip(keys, key))
        row.update(
            n_seeds=len(v),
            observed=float(v.mean()),
            seed_sd=float(v.std(ddof=1)) if len(v) > 1 else math.nan,
            seed_min=float(v.min()),
            seed_max=float(v.max()),
        )
        try:
            fit = fit_law(rest, variable, factors, cluster=None)
            pred = fit.predict(key[0], **dict(zip(factors, key[1:])))[0]
        except ValueError:
            pred = math.nan
        row.update(predicted=pred, error=pred - row["observed"])
        row["within_seeds"] = bool(row["seed_min"] <= pred <= row["seed_max"])
        rows.append(row)
    return pd.DataFrame(rows)


def held_out_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per label: cells, RMS held-out error, the RMS seed standard deviation, their ratio,
    the median |error| / seed sd and the share of cells predicted within their seeds' range."""
    rows = []
    for label, g in cells.groupby("label", sort=True):
        ok = g[np.isfinite(g["error"])]
        rms = float(np.sqrt((ok["error"] ** 2).mean())) if len(ok) else math.nan
        sd = float(np.sqrt((ok["seed_sd"] ** 2).mean())) if len(ok) else math.nan
        rows.append(
            {
                "label": label,
                "cells": len(g),
                "rms_error": rms,
                "rms_seed_sd": sd,
                "ratio": rms / sd if sd > 0 else math.nan,
                "median_abs_error_over_sd": float((ok["error"].abs() / ok["seed_sd"]).median()),
                "within_seeds": float(ok["within_seeds"].mean()) if len(ok) else math.nan,
            }
        )
    return pd.DataFrame(rows)


# -- the loss law --------------------------------------------------------------------


def _chinchilla(theta, logn, logd):
    e, log_a, a, log_b, b = theta
    return e + np.exp(log_a - a * logn) + np.exp(log_b - b * logd)


def loss_law(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per label: the Chinchilla fit (E, A, a, B, b with asymptotic intervals and ``identified``)
    and the log-linear fit (``alpha_n``, ``gamma_d`` with seed-clustered intervals)."""
    rows = []
    ok = np.isfinite(table["final_val_loss"]) & (table["final_val_loss"] > 0)
    data = table[ok & np.isfinite(table["params"]) & np.isfinite(table["tokens"])]
    for label, g in data.groupby("label", sort=True):
        row: dict = {"label": label, "n": len(g)}
        logn, logd = np.log(g["params"].to_numpy(float)), np.log(g["tokens"].to_numpy(float))
        loss = g["final_val_loss"].to_numpy(float)
        row.update(_loglinear(logn, logd, loss, g["seed"].to_numpy(), confidence))
        row.update(_chinchilla_fit(logn, logd, loss, confidence))
        rows.append(row)
    return pd.DataFrame(rows)


def _loglinear(logn, logd, loss, seeds, confidence) -> dict:
    cols = [np.ones_like(logn)]
    names = []
    for name, x in (("alpha_n", logn), ("gamma_d", logd)):
        if np.ptp(x) > 0:
            cols.append(x - x.mean())
            names.append(name)
    X = np.column_stack(cols)
    out = {f"{n}{s}": math.nan for n in ("alpha_n", "gamma_d") for s in ("", "_low", "_high")}
    try:
        beta, covs, df, resid, _ = ols_clustered(X, np.log(loss), seeds)
    except ValueError:
        return out
    half = _t(confidence, df)
    for i, name in enumerate(names, start=1):
        se = _se(covs, np.eye(len(beta))[i])
        out.update({name: beta[i], f"{name}_low": beta[i] - half * se, f"{name}_high": beta[i] + half * se})
    return out


def _chinchilla_fit(logn, logd, loss, confidence) -> dict:
    keys = ("E", "A", "a", "B", "b")
    out = {k: math.nan for k in keys} | {f"{k}_{s}": math.nan for k in ("E", "a", "b") for s in ("low", "high")}
    out.update(identified=False, why="")
    if np.ptp(logn) == 0 or np.ptp(logd) == 0:
        out["why"] = "N or D does not vary"
        return out
    lower = [0.0, -20.0, 0.0, -20.0, 0.0]
    upper = [float(loss.min()), 50.0, 3.0, 50.0, 3.0]
    best = None
    # a grid of starts: the fit is not convex (E trades against A and B)
    for e0 in (0.0, 0.5 * loss.min(), 0.9 * loss.min()):
        for a0 in (0.1, 0.3, 0.7):
            for b0 in (0.1, 0.3, 0.7):
                x0 = [e0, math.log(max(loss.mean() - e0, 1e-3)) + a0 * logn.mean(), a0]
                x0 += [math.log(max(loss.mean() - e0, 1e-3)) + b0 * logd.mean(), b0]
                x0 = np.clip(x0, np.array(lower) + 1e-9, np.array(upper) - 1e-9)
                res = optimize.least_squares(
                    lambda t: _chinchilla(t, logn, logd) - loss,
                    x0,
                    bounds=(lower, upper),
                    method="trf",
                    x_scale="jac",
                    ftol=1e-12,
                    xtol=1e-12,
                    gtol=1e-12,
                )
                if best is None or res.cost < best.cost:
                    best = res
    theta = best.x
    n, k = len(loss), len(theta)
    for name, v in zip(keys, (theta[0], math.exp(theta[1]), theta[2], math.exp(theta[3]), theta[4])):
        out[name] = float(v)
    at_bound = [keys[i] for i in range(k) if min(theta[i] - lower[i], upper[i] - theta[i]) < 1e-6]
    J = best.jac
    s2 = 2 * best.cost / (n - k) if n > k else math.nan
    try:
        cov = np.linalg.inv(J.T @ J) * s2
        cond = np.linalg.cond(J.T @ J)
    except np.linalg.LinAlgError:
        cov, cond = None, math.inf
    reasons = []
    if at_bound:
        reasons.append(f"{', '.join(at_bound)} at a bound")
    if cov is None or not np.all(np.isfinite(np.diag(cov))) or cond > 1e12:
        reasons.append("the Jacobian is singular: N and D do not separate E, A and B")
    else:
        half = _t(confidence, n - k)
        for name, i in (("E", 0), ("a", 2), ("b", 4)):
            se = math.sqrt(max(cov[i, i], 0.0))
            out[f"{name}_low"], out[f"{name}_high"] = theta[i] - half * se, theta[i] + half * se
        for name, i in (("a", 2), ("b", 4)):
            se = math.sqrt(max(cov[i, i], 0.0))
            if not se < 0.5 * max(theta[i], 1e-12):
                reasons.append(f"{name} is not determined (its standard error ≥ half its value)")
    out["identified"] = not reasons
    out["why"] = "; ".join(reasons)
    return out


# -- extrapolation ------------------------------------------------------------------


def extrapolate(fit: LawFit, table: pd.DataFrame, target: dict | None = None) -> pd.DataFrame:
    """The law at ``target`` (default ``PAPER_160M``; ``ffn`` may be a list): per label × ffn the
    predicted response and its interval, as a rank where the variable is a log rank, with
    ``extrapolation``: the largest factor of the target over the data's range (× beyond it)."""
    target = dict(PAPER_160M if target is None else target)
    ffns = target.pop("ffn")
    ffns = ffns if isinstance(ffns, (list, tuple)) else (ffns,)
    var = next((v for v in CAPACITY_VARIABLES if v.name == fit.variable), None)
    is_log = var.log if var is not None else True
    rows = []
    for label in fit.labels:
        for ffn in ffns:
            levels = {"ffn": ffn, **target}
            beyond = max(
                max(levels[f] / table[f].max(), table[f].min() / levels[f]) for f in fit.factors if f in levels
            )
            est, lo, hi = fit.predict(label, **{f: levels[f] for f in fit.factors})
            row = {"label": label, "ffn": ffn, "variable": fit.variable, "extrapolation": float(beyond)}
            if is_log:
                row.update(value=math.exp(est), ci_low=math.exp(lo), ci_high=math.exp(hi))
                row["frac_of_width"] = row["value"] / ffn
            else:
                row.update(value=est, ci_low=lo, ci_high=hi, frac_of_width=math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def fixed_factors(table: pd.DataFrame, fit: LawFit, target: dict | None = None) -> dict[str, float]:
    """Factors of the target that the law cannot see (one value in the data) → that value."""
    target = PAPER_160M if target is None else target
    seen = set(fit.factors) | set(fit.aliased)
    return {f: float(table[f].iloc[0]) for f in FACTORS if f in target and f not in seen}


# -- everything at once ----------------------------------------------------------------


@dataclass
class Law:
    table: pd.DataFrame
    fits: dict[str, LawFit]
    held_out: dict[str, pd.DataFrame]
    held_out_summary: pd.DataFrame
    loss: pd.DataFrame
    paper: pd.DataFrame
    fixed: dict[str, float]


def capacity_law(
    sweep: Sweep,
    last_k: int = 5,
    site: str = "post",
    cluster: str | None = "seed",
    confidence: float = 0.95,
    target: dict | None = None,
    final_fraction: float | None = None,
) -> Law:
    """Every capacity variable's joint fit, its held-out validation, the loss law and the target table."""
    table = law_table(sweep, last_k, site, final_fraction)
    fits, cells, summaries, paper = {}, {}, [], []
    for var in CAPACITY_VARIABLES:
        if not np.isfinite(table[var.name]).any():
            continue
        fit = fit_law(table, var.name, cluster=cluster, confidence=confidence)
        fits[var.name] = fit
        cells[var.name] = held_out(table, var.name, fit.factors)
        summaries.append(held_out_summary(cells[var.name]).assign(variable=var.name))
        paper.append(extrapolate(fit, table, target))
    if not fits:
        raise ValueError("no capacity variable has a finite value in any run")
    first = next(iter(fits.values()))
    return Law(
        table=table,
        fits=fits,
        held_out=cells,
        held_out_summary=pd.concat(summaries, ignore_index=True),
        loss=loss_law(table, confidence),
        paper=pd.concat(paper, ignore_index=True),
        fixed=fixed_factors(table, first, target),
    )
