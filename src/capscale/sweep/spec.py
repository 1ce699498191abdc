"""Sweep specs: a base training config × axes → named run configs.

A spec (TOML/YAML/dict)::

    name = "demo"
    base = "smoke"                      # a training preset (optional)
    [base_config]                        # overrides of the base, dotted or nested
    "train.steps" = 120
    [axes]
    ffn_mult = [1, 4, 16]                # or ffn_width = [...]
    optimizer = ["adamw", {name = "dion", label = "dion_r1_4", params = {rank_fraction = 0.25}}]
    seed = [0, 1]
    steps = [600]                        # step budgets
    arch = [{label = "rope"}, {label = "nope", model = {pos = "none"}}]
    [[extra]]                            # extra arms outside the grid (e.g. the matched-loss arm)
    axes = {optimizer = ["adamw"], steps = [1200]}
    gpus_per_run = 2                     # local executor: GPUs per concurrent run (torchrun if > 1)
    [slurm]                              # --executor slurm: passed to submitit, one job per run
    partition = "gpu"
    gpus_per_node = 2                    # the run's GPUs (torchrun if > 1); default gpus_per_run
    nodes = 1
    time = "12:00:00"                    # SLURM time limit: minutes or [D-]HH:MM:SS
    account = "myproject"
    slurm_qos = "high"                   # any other submitit slurm_* option

Every run gets a stable name from its axis values, so a re-run of the sweep maps
each config onto the same directory and resumes it. ``gpus_per_run`` and ``[slurm]``
say how to run, not what: they are not part of the sweep's identity (``sweep.json``),
so a sweep may be resumed on other hardware.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capscale.train.config import RunConfig, apply_overrides, load_config_file, resolve

AXES = ("ffn_mult", "ffn_width", "optimizer", "seed", "steps", "arch")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class SweepSpec:
    name: str
    base: str | None = None
    base_config: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)
    extra: list[dict[str, Any]] = field(default_factory=list)
    analysis: dict[str, Any] = field(default_factory=dict)  # defaults for the report (k, tolerance, ...)
    gpus_per_run: int | None = None  # how to run, not what: left out of to_dict()
    slurm: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        valid = {"name", "base", "base_config", "axes", "extra", "analysis", "gpus_per_run", "slurm"}
        if not isinstance(d, dict):
            raise ValueError(f"a sweep spec must be a table (a JSON/TOML object), got {type(d).__name__} {d!r:.60}")
        unknown = sorted(map(str, set(d) - valid))
        if unknown:
            raise ValueError(f"unknown sweep key(s) {unknown}; valid: {sorted(valid)}")
        if "name" not in d:
            raise ValueError("a sweep spec needs a name")
        spec = cls(**copy.deepcopy(d))
        if spec.gpus_per_run is not None and (_not_int(spec.gpus_per_run) or spec.gpus_per_run < 0):
            raise ValueError(f"gpus_per_run must be a whole number >= 0, got {spec.gpus_per_run!r}")
        spec.slurm = check_slurm(spec.slurm)
        slurm_gpus(spec.slurm, spec.gpus_per_run)
        spec.runs()  # validate every run now, before anything is launched
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "base_config": self.base_config,
            "axes": self.axes,
            "extra": self.extra,
            "analysis": self.analysis,
        }

    def runs(self) -> dict[str, RunConfig]:
        """All run configs by run name (grid first, then extra arms; duplicates merged)."""
        out: dict[str, RunConfig] = {}
        for axes in [self.axes] + [e.get("axes", {}) for e in self.extra]:
            for name, cfg in _expand(self, axes):
                out.setdefault(name, cfg)
        if not out:
            raise ValueError(f"sweep {self.name!r} has no runs")
        return out


SLURM_KEYS = {"partition": str, "account": str, "time": (str, int), "nodes": int, "gpus_per_node": int}
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def _not_int(v: Any) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def check_slurm(table: Any) -> dict[str, Any]:
    """The ``[slurm]`` table, checked: its known keys typed, others ``slurm_*`` options of
    submitit's SLURM executor (checked against it where submitit is installed)."""
    if not isinstance(table, dict):
        raise ValueError(f"[slurm] must be a table, got {table!r}")
    for key, value in table.items():
        if key in SLURM_KEYS:
            kind = SLURM_KEYS[key]
            if (kind is int and (_not_int(value) or value < 0)) or not isinstance(value, kind) or value is True:
                raise ValueError(f"[slurm] {key} must be {'a whole number' if kind is int else 'a string'}: {value!r}")
        elif not key.startswith("slurm_"):
            raise ValueError(
                f"[slurm] has no option {key!r}; known: {sorted(SLURM_KEYS)}, or any submitit slurm_* option"
            )
    if "time" in table and not _SLURM_TIME.match(str(table["time"])):
        raise ValueError(f"[slurm] time must be minutes or [D-]HH:MM:SS, got {table['time']!r}")
    if table.get("nodes", 1) != 1:
        raise ValueError(f"[slurm] nodes = {table['nodes']}: a run spans one node (torchrun on its GPUs); use 1")
    extra = [k[len("slurm_") :] for k in table if k.startswith("slurm_")]
    if extra:
        try:
            from submitit import SlurmExecutor
        except ImportError:  # checked by submitit when the sweep is submitted
            return dict(table)
        bad = sorted(set(extra) - set(SlurmExecutor._valid_parameters()))
        if bad:
            raise ValueError(f"[slurm] submitit has no SLURM option {['slurm_' + b for b in bad]}")
    return dict(table)


def slurm_gpus(table: dict[str, Any], gpus_per_run: int | None) -> int:
    """GPUs of one run on SLURM: ``gpus_per_node``, else ``gpus_per_run``, else 0."""
    node = table.get("gpus_per_node")
    if node is not None and gpus_per_run is not None and node != gpus_per_run:
        raise ValueError(f"gpus_per_run ({gpus_per_run}) and [slurm] gpus_per_node ({node}) disagree")
    return node if node is not None else (gpus_per_run or 0)


def _axis_values(axes: dict[str, list], key: str) -> list:
    vals = axes.get(key)
    if vals is None:
        return [None]
    if not isinstance(vals, list) or not vals:
        raise ValueError(f"sweep axis {key!r} must be a non-empty list, got {vals!r}")
    return vals


def _optimizer(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if isinstance(v, str):
        return {"name": v}
    if isinstance(v, dict) and "name" in v:
        return v
    raise ValueError(f"optimizer axis entries are names or tables with a name, got {v!r}")


def _expand(spec: SweepSpec, axes: dict[str, list]):
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"unknown sweep axis {unknown}; valid axes: {list(AXES)}")
    if "ffn_mult" in axes and "ffn_width" in axes:
        raise ValueError("give the width axis as ffn_mult or ffn_width, not both")
    wkey = "ffn_width" if "ffn_width" in axes else "ffn_mult"
    grid = itertools.product(*(_axis_values(axes, k) for k in (wkey, "optimizer", "seed", "steps", "arch")))
    for width, opt, seed, steps, arch in grid:
        over: dict[str, Any] = dict(spec.base_config)
        parts = []
        o = _optimizer(opt)
        if o:
            over["optimizer.name"] = o["name"]
            over["optimizer.label"] = o.get("label") or o["name"]
            over["optimizer.params"] = dict(o.get("params", {}))
        if width is not None:
            over[f"model.{wkey}"] = width
        if seed is not None:
            over["train.seed"] = seed
        if steps is not None:
            over["train.steps"] = steps
        if arch is not None:
            if not isinstance(arch, dict) or "label" not in arch:
                raise ValueError(f"arch axis entries are tables with a label, got {arch!r}")
            for k, v in arch.get("model", {}).items():
                over[f"model.{k}"] = v
        over["train.progress"] = False  # many runs at once: the sweep reports progress
        cfg = _resolve(spec, over)
        label = cfg.label
        parts.append(_SAFE.sub("-", label))
        parts.append(f"w{cfg.model_config().ffn_dim}")
        if arch is not None:
            parts.append(_SAFE.sub("-", str(arch["label"])))
        if steps is not None:
            parts.append(f"t{cfg.train.steps}")
        parts.append(f"s{cfg.train.seed}")
        name = "_".join(parts)
        cfg.name = name
        yield name, cfg


def _resolve(spec: SweepSpec, overrides: dict[str, Any]) -> RunConfig:
    if spec.base is not None:
        return resolve(spec.base, overrides=overrides)
    return RunConfig.from_dict(apply_overrides({}, overrides))


# -- presets ------------------------------------------------------------------

SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    # tests: about a minute on 2 cores
    "smoke": {
        "name": "smoke",
        "base": "smoke",
        "axes": {"ffn_mult": [1, 2, 4], "optimizer": ["adamw", "muon"]},
        "analysis": {"last_k": 2},
    },
    # the README's main job: under 5 minutes on 2 cores
    "demo": {
        "name": "demo",
        "base": "smoke",
        "base_config": {
            "model.d_model": 64,
            "model.n_head": 2,
            "model.n_layer": 2,
            "model.seq_len": 64,
            "data.max_tokens": 600_000,
            "data.tokenizer": "bytebpe:1024",
            "train.steps": 300,
            "train.batch_size": 16,
            "train.eval_every": 50,
            "train.log_every": 10,
            "train.checkpoint_every": 50,
            "telemetry.every": 25,
            "telemetry.window": 8,
        },
        # The CPU study (docs/replication.md) finds Muon's advantage over AdamW in the level of
        # rank at every width (hard rank 2.0-2.8x), not in its growth; so the demo spends its
        # budget on two seeds at x1-x8 rather than on x16, the costliest and least-sampled width.
        "axes": {"ffn_mult": [1, 2, 4, 8], "optimizer": ["adamw", "muon"], "seed": [0, 1]},
        "analysis": {"last_k": 3},
    },
    # the CPU replication study (issue: "The CPU replication study")
    "cpu": {
        "name": "cpu",
        "base": "cpu",
        "axes": {
            "ffn_mult": [1, 2, 4, 8, 16],
            "optimizer": [
                "adamw",
                "muon",
                "normuon",
                {"name": "dion", "label": "dion_r1_2", "params": {"rank_fraction": 0.5}},
                {"name": "dion", "label": "dion_r1_16", "params": {"rank_fraction": 0.0625}},
                "shampoo",
            ],
            "seed": [0, 1, 2],
        },
        "extra": [
            {"axes": {"ffn_mult": [1, 2, 4, 8, 16], "optimizer": ["adamw"], "seed": [0, 1, 2], "steps": [1200]}},
            {
                "axes": {
                    "ffn_mult": [1, 2, 4, 8, 16],
                    "optimizer": ["adamw", "muon"],
                    "seed": [0],
                    "arch": [{"label": "nope", "model": {"pos": "none"}}],
                }
            },
        ],
        "analysis": {"last_k": 5},
    },
    "paper-160m": {
        "name": "paper-160m",
        "base": "paper-160m",
        "axes": {
            "ffn_mult": [1, 2, 3, 4, 5, 6, 7, 8],
            "optimizer": [
                "adamw",
                "muon",
                "normuon",
                {"name": "dion", "label": "dion_r1_2", "params": {"rank_fraction": 0.5}},
                {"name": "dion", "label": "dion_r1_16", "params": {"rank_fraction": 0.0625}},
            ],
        },
        "extra": [{"axes": {"ffn_mult": [1, 2, 3, 4, 5, 6, 7, 8], "optimizer": ["adamw"], "steps": [12000]}}],
        "analysis": {"last_k": 5},
    },
    "paper-350m": {
        "name": "paper-350m",
        "base": "paper-350m",
        "axes": {"ffn_mult": [1, 2, 3, 4], "optimizer": ["adamw", "muon", "normuon"]},
        "analysis": {"last_k": 5},
    },
}


# The long-training study: does the exponent gap between Muon and AdamW move with tokens per
# parameter, and with d_model? Widths are ×1, ×2, ×4 of d_model at each d_model; each d_model
# has a short budget (5 tokens per non-embedding parameter at ×4) and a long one (20), both
# warm-down runs, so the long run's constant-LR points are its trajectory and the short run is
# the same amount of training decayed. Steps are 20 × params(×4) / 2,048 tokens per step,
# params = n_layer·(4d² + 2d·4d) + vocab·d (lm_head counted). docs/replication.md, "cpu-long".
_LONG_ARMS = {32: (1, 140, 560), 64: (2, 400, 1600), 96: (3, 780, 3120)}  # d_model: (n_head, short, long)


def _long_arm(d: int) -> dict[str, list]:
    heads, short, long = _LONG_ARMS[d]
    return {
        "ffn_mult": [1, 2, 4],
        "optimizer": ["adamw", "muon"],
        "seed": [0, 1, 2],
        "steps": [short, long],
        "arch": [{"label": f"d{d}", "model": {"d_model": d, "n_head": heads}}],  # head size 32 throughout
    }


SWEEP_PRESETS["cpu-long"] = {
    "name": "cpu-long",
    "base": "cpu",
    "base_config": {
        "model.n_layer": 2,
        "data.tokenizer": "bytebpe:1024",
        "train.eval_every": 80,
        "train.log_every": 20,
        "train.checkpoint_every": 80,
        "telemetry.every": 80,
        "telemetry.window": 12,  # 24,576 tokens: N/D >= 10 in every bucket up to FFN width 384
    },
    # the first arm is the grid, the others extra arms: a sweep's runs are its grid plus extras
    "axes": _long_arm(32),
    "extra": [{"axes": _long_arm(d)} for d in (64, 96)],
    "analysis": {"last_k": 3},
}


def load_spec(preset: str | None = None, config_file: str | Path | None = None) -> SweepSpec:
    if (preset is None) == (config_file is None):
        raise ValueError("give exactly one of a sweep preset or a sweep config file")
    if preset is not None:
        if preset not in SWEEP_PRESETS:
            raise ValueError(f"unknown sweep preset {preset!r}; choose from {sorted(SWEEP_PRESETS)}")
        return SweepSpec.from_dict(SWEEP_PRESETS[preset])
    return SweepSpec.from_dict(load_config_file(config_file))


# The depth study (docs/preregistration/cpu-depth.md): d_model 64, depth 2 and 6, FFN ×1-×8,
# AdamW and Muon at rates chosen by the pre-registered rule, 5 seeds. Each depth trains on
# 20 tokens per non-embedding parameter of its ×4 model, n_layer·(4d² + 2d·4d) + vocab·d,
# at 2,048 tokens per step: 3,520 steps at depth 6, 1,600 at depth 2.
_DEPTH_STEPS = {6: 3520, 2: 1600}
# Chosen by the pre-registered rule from the cpu-depth-lr runs (docs/results/cpu-depth/lr): the
# lowest mean final validation loss at x1 and x8. Muon's 0.01 is the lowest candidate.
CPU_DEPTH_LR = {"adamw": 3e-3, "muon": 0.01}
CPU_DEPTH_LR_CANDIDATES = {"adamw": [1e-3, 3e-3, 1e-2], "muon": [0.01, 0.02, 0.04]}
_DEPTH_BASE = {
    "model.d_model": 64,
    "model.n_head": 2,  # head size 32
    "data.tokenizer": "bytebpe:1024",
    "train.eval_every": 160,
    "train.log_every": 20,
    "train.checkpoint_every": 160,
    "telemetry.every": 160,
    # 24,576 tokens, about 8,060 in the smallest token bucket (HEAD, 32.8%): N/D >= 10 up to width 512
    "telemetry.window": 12,
}


def _depth_arm(depth: int, seeds: list[int]) -> dict[str, list]:
    return {
        "ffn_mult": [1, 2, 4, 8],
        "optimizer": [{"name": o, "params": {"lr": lr}} for o, lr in CPU_DEPTH_LR.items()],
        "seed": seeds,
        "steps": [_DEPTH_STEPS[depth]],
        "arch": [{"label": f"L{depth}", "model": {"n_layer": depth}}],
    }


# the grid: depth 6 first, then depth 2 (a sweep runs seed-major, then arm by arm)
SWEEP_PRESETS["cpu-depth"] = {
    "name": "cpu-depth",
    "base": "cpu",
    "base_config": _DEPTH_BASE,
    "axes": _depth_arm(6, [0, 1, 2, 3, 4]),
    "extra": [{"axes": _depth_arm(2, [0, 1, 2, 3, 4])}],
    "analysis": {"last_k": 3},
}
# the repetition arm: depth 6 on the first half of the corpus (twice the passes over it), its own sweep
SWEEP_PRESETS["cpu-depth-rep"] = {
    "name": "cpu-depth-rep",
    "base": "cpu",
    "base_config": {**_DEPTH_BASE, "data.max_tokens": 1_075_112},
    "axes": _depth_arm(6, [0, 1, 2]),
    "analysis": {"last_k": 3},
}
# the learning-rate runs: depth 6, ×1 and ×8, seed 0, 5 tokens per parameter (880 steps); each
# rate its own label, so that the report keeps them apart
SWEEP_PRESETS["cpu-depth-lr"] = {
    "name": "cpu-depth-lr",
    "base": "cpu",
    "base_config": {
        **_DEPTH_BASE,
        "train.eval_every": 220,
        "train.eval_batches": 32,
        "train.checkpoint_every": 220,
        "telemetry.every": 220,
    },
    "axes": {
        "ffn_mult": [1, 8],
        "optimizer": [
            {"name": o, "label": f"{o}_lr{lr:g}", "params": {"lr": lr}}
            for o, rates in CPU_DEPTH_LR_CANDIDATES.items()
            for lr in rates
        ],
        "seed": [0],
        "steps": [_DEPTH_STEPS[6] // 4],
        "arch": [{"label": "L6", "model": {"n_layer": 6}}],
    },
}
