"""Run configuration: dataclasses, presets, files (TOML/YAML) and ``--set k=v`` overrides.

A run is fully described by a ``RunConfig``; ``resolve`` turns a preset or a
config file plus overrides into one, and ``RunConfig.to_dict`` is what a run
directory's ``config.json`` holds (with the FFN width resolved to an int).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

# The [telemetry] table builds the probe's own config object (re-exported here).
from capscale.probe.config import (  # noqa: F401
    Background,
    GemmDtype,
    Site,
    SpectrumMethod,
    StateLayout,
    TelemetryConfig,
)
from capscale.probe.config import check_at_least as _check_at_least
from capscale.probe.config import check_types as _check_types
from capscale.train.data import DataConfig
from capscale.train.model import GPTConfig
from capscale.train.optim import optimizer_config

Schedule = Literal["warmdown", "cosine", "constant"]  # warmdown: the paper's
TrainDtype = Literal["float32", "bfloat16"]  # bfloat16: autocast, on CUDA only
# "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N", "mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_MAX_SEED = 2**63 - 1  # torch.manual_seed's range (and NumPy's SeedSequence takes it)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    label: str | None = None  # grouping/display label, e.g. "dion_r1_16"; defaults to name
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the optimizer's defaults

    def __post_init__(self) -> None:
        _check_types(self, "optimizer")
        optimizer_config(self.name, **self.params)  # unknown names/params and bad values fail here


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16  # sequences per optimizer step (all micro-batches, all ranks)
    micro_batch_size: int | None = None  # sequences per forward; None = batch_size (no accumulation)
    seed: int = 0
    schedule: Schedule = "warmdown"
    warmup_steps: int = 0
    warmdown_frac: float = 0.2
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    dtype: TrainDtype = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    grad_clip: float | None = None  # the paper does not clip
    compile: bool = False
    progress: bool = True  # a progress bar in a terminal, log lines otherwise

    def __post_init__(self) -> None:
        _check_types(self, "train")
        positive = ("steps", "batch_size", "micro_batch_size", "eval_every", "eval_batches", "log_every")
        _check_at_least("train", self, (*positive, "checkpoint_every", "keep_checkpoints"), 1)
        _check_at_least("train", self, ("seed", "warmup_steps"), 0)
        if self.seed > _MAX_SEED:
            raise ValueError(f"train.seed must be at most 2**63 - 1, got {self.seed}")
        if self.batch_size % (self.micro_batch_size or self.batch_size):
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if not 0 <= self.warmdown_frac <= 1:
            raise ValueError(f"train.warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"train.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class RunConfig:
    name: str = "run"
    model: GPTConfig = field(default_factory=GPTConfig)  # vocab_size is set from the tokenizer at train time
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = GPTConfig.from_dict(self.model)
        self.validate()

    def validate(self) -> None:
        _check_types(self, "run")
        if not isinstance(self.data.val_fraction, (int, float)) or isinstance(self.data.val_fraction, bool):
            raise ValueError(f"data.val_fraction must be a number in (0, 1), got {self.data.val_fraction!r}")
        if self.data.cache_dir is not None:
            raise ValueError("data.cache_dir is machine-specific: set $CAPSCALE_HOME instead")
        if not 0 < self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")

    def model_config(self) -> GPTConfig:
        return self.model

    def with_vocab(self, vocab_size: int) -> RunConfig:
        """A copy whose model has the tokenizer's vocabulary (this config is left as it is)."""
        return replace(self, model=replace(self.model, vocab_size=vocab_size))

    @property
    def label(self) -> str:
        return self.optimizer.label or self.optimizer.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the model section carries the resolved absolute ``ffn_width``."""
        d = asdict(self)
        m = self.model
        d["model"] = {**m.to_dict(), "ffn_width": m.ffn_dim, "ffn_mult": None}
        d["optimizer"]["label"] = self.label
        d["telemetry"]["sites"] = list(self.telemetry.sites)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = copy.deepcopy(d)
        _check_keys(d, cls, "")
        sections = {
            "optimizer": OptimizerConfig,
            "data": DataConfig,
            "train": TrainConfig,
            "telemetry": TelemetryConfig,
        }
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k not in sections}
        if "model" in kwargs:
            if not isinstance(kwargs["model"], dict):
                raise ValueError(f"config section model must be a table/mapping, got {kwargs['model']!r}")
            kwargs["model"] = GPTConfig.from_dict(kwargs["model"])
        for key, kind in sections.items():
            if key in d:
                _check_keys(d[key], kind, key + ".")
                kwargs[key] = kind(**d[key])
        return cls(**kwargs)


# Fields that say how a run is computed or shown, not what it computes: a run may be resumed,
# and a sweep re-planned, with them changed.
_NOT_IDENTITY = {"train": ("progress",), "telemetry": ("background", "states")}


def run_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """What makes two run configs (``config.json``/``request.json`` dicts) the same run: the
    config with defaults filled in, so a field added since does not make an older run look
    different, without ``versions`` and the fields that do not change results."""
    full = RunConfig.from_dict({k: v for k, v in cfg.items() if k != "versions"}).to_dict()
    for section, keys in _NOT_IDENTITY.items():
        full[section] = {k: v for k, v in full[section].items() if k not in keys}
    return full


def _check_keys(d: Any, kind: type, prefix: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or 'root'} must be a table/mapping, got {d!r}")
    valid = {f.name for f in fields(kind)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid: {sorted(prefix + v for v in valid)}"
        )


# -- presets ------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a laptop CPU: for tests and smoke checks
    "smoke": {
        "name": "smoke",
        "model": {"seq_len": 32, "n_layer": 2, "n_head": 2, "d_model": 32, "ffn_mult": 4},
        "data": {"tokenizer": "bytebpe:512", "max_tokens": 200_000},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "eval_every": 10,
            "eval_batches": 2,
            "log_every": 5,
            "checkpoint_every": 10,
            "progress": False,
        },
        "telemetry": {"every": 10, "window": 2},
    },
    # the CPU study: small GPT, FFN ×1…×16 across a sweep
    "cpu": {
        "name": "cpu",
        "model": {"seq_len": 128, "n_layer": 4, "n_head": 4, "d_model": 128, "ffn_mult": 4},
        "data": {"tokenizer": "bytebpe:4096"},
        "train": {
            "steps": 600,
            "batch_size": 16,
            "eval_every": 100,
            "eval_batches": 8,
            "log_every": 10,
            "checkpoint_every": 100,
        },
        "telemetry": {"every": 25, "window": 4},
    },
    # the paper's GPT-2 160M: 12 × 768, FFN 768·{1…8}, 512 tokens × 1024 sequences, 6000 steps
    "paper-160m": {
        "name": "paper-160m",
        "model": {"vocab_size": 50304, "seq_len": 512, "n_layer": 12, "n_head": 12, "d_model": 768, "ffn_mult": 4},
        "data": {"source": "fineweb-edu", "tokenizer": "gpt2", "max_tokens": 3_300_000_000},
        "train": {
            "steps": 6000,
            "batch_size": 1024,
            "micro_batch_size": 64,
            "eval_every": 200,
            "eval_batches": 20,
            "log_every": 10,
            "checkpoint_every": 500,
            "dtype": "bfloat16",
            "grad_clip": None,
        },
        # a window's eigendecompositions (up to 6,144 wide) run off the training path; rows are identical.
        # states "auto": on the device while they take ≤ 1/4 of its free memory, else in host memory
        # (the device then holds one D×D GEMM buffer: tens of MB, docs/scale.md)
        "telemetry": {"every": 200, "window": 1, "background": True, "states": "auto"},
    },
}


# 350M: 24 × 1024, FFN 1024·{1…4}; otherwise the 160M setup.
PRESETS["paper-350m"] = {
    **PRESETS["paper-160m"],
    "name": "paper-350m",
    "model": {**PRESETS["paper-160m"]["model"], "n_layer": 24, "n_head": 16, "d_model": 1024},
    "train": {**PRESETS["paper-160m"]["train"], "micro_batch_size": 32},
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config into a plain dict; one line naming the file if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file must be .toml, .yaml/.yml or .json, got {path.name}")
    try:
        data = _parse_config_text(path.read_text(encoding="utf-8"), path.suffix)
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text") from None
    except ValueError as exc:  # one line naming the file, whatever the parser said
        raise ValueError(f"config file {path} cannot be read: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of keys, not {type(data).__name__}")
    return data


def _parse_config_text(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)  # TOMLDecodeError is a ValueError
    if suffix == ".json":
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}  # safe_load: a !!python/... tag is refused, never run
    except yaml.YAMLError as exc:
        hint = (
            " (Python object tags are refused: configs are read with yaml.safe_load)" if "python/" in str(exc) else ""
        )
        raise ValueError(f"{type(exc).__name__}: {exc}{hint}") from None


def _parse_value(text: str) -> Any:
    """``--set`` values: JSON literals (numbers, true/false/null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# Shorthands accepted by --set, e.g. ``--set optimizer=muon``.
_ALIASES = {
    "optimizer": "optimizer.name",
    "width": "model.ffn_width",
    "ffn_mult": "model.ffn_mult",
    "steps": "train.steps",
    "seed": "train.seed",
    "lr": "optimizer.params.lr",
}


def apply_overrides(d: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys) to a config dict; returns a new dict."""
    d = copy.deepcopy(d)
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        key = _ALIASES.get(key, key)
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"cannot set {key}: {p} is not a section")
        if parts[0] == "model" and parts[-1] in ("ffn_width", "ffn_mult") and value is not None:
            # the two ways of giving the width exclude each other: the override wins. Clearing
            # one (None) leaves the other as it is.
            node.pop("ffn_mult" if parts[-1] == "ffn_width" else "ffn_width", None)
        node[parts[-1]] = value
    return d


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override must look like key=value, got {text!r}")
    return key.strip(), _parse_value(value.strip())


def resolve(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] | dict[str, Any] = ()
) -> RunConfig:
    """Preset and/or file, then overrides → a validated ``RunConfig``."""
    d: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        d = copy.deepcopy(PRESETS[preset])
    if config_file is not None:
        d = _deep_merge(d, load_config_file(config_file))
    if preset is None and config_file is None:
        raise ValueError("give a preset or a config file")
    return RunConfig.from_dict(apply_overrides(d, overrides))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
