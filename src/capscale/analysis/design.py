"""The study's design: which config fields vary (factors), the treatment, and the cells.

Every field of ``config.json`` that varies across the analysed runs is a **factor**,
nested (``train.steps``) or top-level (a user loop's ``run_config={"lr": 3e-3}`` stores
``lr`` at the top level). The FFN width is the scaling axis and the seed the unit of
replication; neither is a factor. Fields that only describe how a run was executed
(``IGNORED``: names, versions, devices, checkpointing, progress bars) are not factors, nor
are the measurement settings (``telemetry.*``, evaluation and logging cadence): they are
listed in ``measurement_varies`` when they vary.

The **treatment** is the optimizer label. A factor that takes one value per label (e.g. a
learning rate tuned per optimizer, or any ``optimizer.*`` field) belongs to the
treatment. Every other factor defines the **cells**: a comparison of treatments is made
only within a cell — same step budget, model, data, variant — never across cells.

A series is a treatment in a cell, named by the label (and its step budget, where the
label has several) and the factors the cell's name needs (``shown``): ``adamw`` at two
learning rates becomes ``adamw · lr=0.001`` and ``adamw · lr=0.003``; a factor determined
by the shown ones (``n_head`` by ``d_model``) is not repeated. Two runs with the same series, width and
seed are refused (``DuplicateRunsError``): they would be counted as two seeds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from capscale.analysis.runs import IncompatibleRunsError, Sweep

TREATMENT = "optimizer.label"
# Not factors: the scaling axis, the replicate, and fields that describe execution only.
IGNORED = frozenset(
    {
        "name",
        "format_version",
        "writer",
        "train.seed",
        "seed",
        "model.ffn_width",
        "model.ffn_mult",
        "ffn_width",
        "train.device",
        "train.progress",
        "train.compile",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "data.cache_dir",
        "telemetry.background",
        "telemetry.monitor_every",
        "telemetry.dtype",
        "optimizer.label",
        "optimizer.name",
        "label",
        "optimizer",
    }
)
IGNORED_PREFIXES = ("versions.", "out", "run_dir")
# How and when a run was measured, not what was trained: listed when they vary, never a factor (a telemetry
# window sized per width to keep N/D >= 10 must not split a series into one-width cells).
MEASUREMENT_PREFIXES = ("telemetry.",)
MEASUREMENT = frozenset({"train.eval_every", "train.log_every", "train.eval_batches"})
# Preferred order of factors in a cell's name: the model first, then the budget.
_ORDER = ("model.n_layer", "model.d_model", "train.steps")


def natural_key(text: str) -> list:
    """Sort key that orders '400 steps' before '1600 steps'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


class DuplicateRunsError(IncompatibleRunsError):
    """Two or more runs share series, width and seed: they are not independent replicates."""


@dataclass(frozen=True)
class Design:
    """``factors``: the cell factors (flattened config keys), in naming order; ``bound``: fields that
    vary only with the treatment; ``shown``: the factors a cell's name needs (the others are
    determined by them, e.g. n_head by d_model); ``cells``: one row per cell (its name, factor values,
    treatments, runs)."""

    treatment: str
    factors: tuple[str, ...]
    bound: tuple[str, ...]
    shown: tuple[str, ...]
    cells: pd.DataFrame
    measurement: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "treatment": self.treatment,
            "factors": list(self.factors),
            "shown": list(self.shown),
            "treatment_bound": list(self.bound),
            "measurement_varies": list(self.measurement),
            "rule": "comparisons of treatments are made within a cell (every factor but the treatment equal); "
            "across cells they are shown per cell and pooled only by a fixed-effect inverse-variance mean",
            "cells": self.cells.to_dict(orient="records"),
        }


def flatten_config(config: dict, prefix: str = "") -> dict[str, str]:
    """Flattened config, values JSON-encoded (hashable); ``null`` and absent are the same."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{name}."))
        elif value is not None:
            out[name] = json.dumps(value, sort_keys=True)
    return out


def _relevant(key: str) -> bool:
    return key not in IGNORED and not key.startswith(IGNORED_PREFIXES) and not _measurement(key)


def _measurement(key: str) -> bool:
    return key in MEASUREMENT or key.startswith(MEASUREMENT_PREFIXES)


def short_name(key: str, keys: tuple[str, ...]) -> str:
    """The last part of a dotted key, unless another factor shares it."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _value_text(key: str, value: str | None) -> str:
    if value is None:
        return "none"
    v = json.loads(value)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _label(key: str, value: str | None, keys: tuple[str, ...]) -> str:
    if key == "train.steps":
        return f"{_value_text(key, value)} steps"
    return f"{short_name(key, keys)}={_value_text(key, value)}"


def read_configs(runs: pd.DataFrame) -> dict[str, dict]:
    """run_id → the run's config.json as written (flattened by the design)."""
    out = {}
    for run_id, path in zip(runs["run_id"], runs["path"]):
        file = Path(path) / "config.json"
        out[run_id] = json.loads(file.read_text()) if file.is_file() else {}
    return out


def design_of(runs: pd.DataFrame, configs: dict[str, dict]) -> tuple[Design, pd.DataFrame]:
    """(design, runs with ``treatment``, ``cell`` and refined ``series``). Raises ``DuplicateRunsError``."""
    flat_all = {r: flatten_config(c) for r, c in configs.items()}
    flat = {r: {k: v for k, v in f.items() if _relevant(k)} for r, f in flat_all.items()}
    measured = pd.DataFrame([{k: v for k, v in f.items() if _measurement(k)} for f in flat_all.values()], dtype=object)
    measurement = tuple(sorted(k for k in measured.columns if measured[k].map(str).nunique() > 1))
    table = pd.DataFrame([flat.get(r, {}) for r in runs["run_id"]], index=runs.index, dtype=object)
    table = table.where(pd.notna(table), None)
    runs = runs.copy()
    runs["treatment"] = runs["label"].astype(str)
    varying = [k for k in table.columns if table[k].map(str).nunique() > 1]
    bound, factors = [], []
    for key in varying:
        per_label = table[key].map(str).groupby(runs["treatment"]).nunique()
        (factors if (per_label > 1).any() else bound).append(key)
    factors.sort(key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))
    keys = tuple(factors)
    shown: list[str] = []
    for key in keys:  # name a factor only where it splits the cells the shown ones make
        groups = table.groupby([table[k].map(str) for k in shown], sort=False) if shown else [(None, table)]
        if any(g[key].map(str).nunique() > 1 for _, g in groups):
            shown.append(key)
    runs["cell"] = [" · ".join(_label(k, table.at[i, k], keys) for k in shown) or "all runs" for i in runs.index]
    # series: the label (with its step budget where it has several), then the shown factors; a factor
    # determined by the shown ones (n_head by d_model) is not named
    budgets = runs.groupby("treatment")["steps"].nunique() if "steps" in runs.columns else None
    names = []
    for i in runs.index:
        label = runs.at[i, "treatment"]
        setting = label
        if budgets is not None and budgets[label] > 1:
            setting = f"{label} · {runs.at[i, 'steps']} steps"
        parts = [_label(k, table.at[i, k], keys) for k in shown if k != "train.steps"]
        names.append(" · ".join([setting, *parts]))
    runs["series"] = names
    _refuse_duplicates(runs)
    cells = (
        runs.groupby("cell", sort=True)
        .agg(
            treatments=("treatment", lambda s: sorted(set(s))),
            n_runs=("run_id", "size"),
            widths=("width", lambda s: sorted(int(w) for w in set(s))),
            n_seeds=("seed", "nunique"),
        )
        .reset_index()
    )
    cells = cells.iloc[sorted(range(len(cells)), key=lambda i: natural_key(cells.at[i, "cell"]))].reset_index(drop=True)
    for key in shown:
        first = runs.groupby("cell")["run_id"].first()
        cells[short_name(key, keys)] = [
            _value_text(key, table.loc[runs["run_id"] == first[c], key].iloc[0]) for c in cells["cell"]
        ]
    design = Design(TREATMENT, keys, tuple(bound), tuple(shown), cells, measurement)
    return design, runs.sort_values(["series", "width", "seed", "run_id"], ignore_index=True)


def _refuse_duplicates(runs: pd.DataFrame) -> None:
    dup = runs[runs.duplicated(["series", "width", "seed"], keep=False)]
    if len(dup):
        groups = dup.groupby(["series", "width", "seed"], sort=True)["run_id"].apply(list)
        shown = "; ".join(f"{s} width {w} seed {sd}: {', '.join(ids)}" for (s, w, sd), ids in groups.items())
        raise DuplicateRunsError(
            f"duplicate runs (same series, width and seed; they are not independent seeds): {shown}. "
            "Remove the repeats or give them distinct seeds."
        )


def apply_design(sweep: Sweep, configs: dict[str, dict] | None = None) -> tuple[Sweep, Design]:
    """The sweep with ``treatment``/``cell`` columns and series split by every factor, and its design."""
    design, runs = design_of(sweep.runs, configs if configs is not None else read_configs(sweep.runs))
    return replace(sweep, runs=runs), design
