"""The run format's ``config.json``, version 1: what names a run's series and its width.

Torch-free, below every layer: the probe writes this format from any training loop
(``capscale.attach(..., out=, run_config=)``) and the analysis reads it, whatever
wrote it. The whole format is documented in ``docs/run-format.md``.

A version-1 config holds (beyond anything else a writer keeps there)::

    {"format_version": 1, "name": ...,
     "optimizer": {"name": "adamw", "label": "adamw", ...},   # the series
     "model": {"ffn_width": 512, "variant": "rope", ...},    # width; the architecture variant
     "train": {"steps": 1000, "seed": 0, ...}}

Configs written before the field existed (capscale's own harness) are version 1.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from typing import Any

FORMAT_VERSION = 1

# Flat run_config keys and where they go in the nested config.
_FLAT = {
    "optimizer": ("optimizer", "name"),
    "label": ("optimizer", "label"),
    "ffn_width": ("model", "ffn_width"),
    "variant": ("model", "variant"),
    "steps": ("train", "steps"),
    "seed": ("train", "seed"),
}
_SECTIONS = ("model", "optimizer", "train")


class RunConfigError(ValueError):
    """A run config that does not say what the format needs, or says it wrongly."""


def _positive_int(value: Any, key: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise RunConfigError(f"run_config {key} must be an int >= {low}, got {value!r}")
    return int(value)


def make_config(run_config: Mapping[str, Any] | None, *, name: str, writer: str) -> dict[str, Any]:
    """A user's ``run_config`` as a version-1 config: flat keys or the nested sections.

    Flat keys: ``optimizer`` (its name, or a dict with ``name``), ``label`` (the
    series name; default the optimizer's), ``ffn_width`` (default: measured),
    ``variant`` (an architecture variant that splits series), ``seed`` (default 0),
    ``steps`` (the step budget; default: the step the run ended at), ``name``. The
    sections ``model``, ``optimizer``, ``train`` may be given as dicts; any other
    key is kept as it is.
    """
    if run_config is None:
        raise RunConfigError(
            "out= needs run_config={'optimizer': ..., 'seed': ..., 'ffn_width': ...}: "
            "the optimizer (or label) names the run's series in the report"
        )
    if not isinstance(run_config, Mapping):
        raise RunConfigError(f"run_config must be a dict, got {type(run_config).__name__}")
    cfg: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": name, "writer": writer}
    sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in run_config.items():
        if key in _SECTIONS and isinstance(value, Mapping):
            sections[key].update(value)
        elif key in _FLAT:
            section, field = _FLAT[key]
            sections[section][field] = value
        elif key == "format_version":
            if value != FORMAT_VERSION:
                raise RunConfigError(f"run_config format_version must be {FORMAT_VERSION}, got {value!r}")
        else:
            cfg[key] = value
    opt = sections["optimizer"]
    if isinstance(opt.get("name"), Mapping):  # optimizer={"name": ..., "lr": ...} as a flat key
        opt.update(opt.pop("name"))
    if not opt.get("name") and not opt.get("label"):
        raise RunConfigError("run_config needs 'optimizer' (or 'label'): it names the run's series in the report")
    for key in ("name", "label"):
        if key in opt and not isinstance(opt[key], str):
            raise RunConfigError(f"run_config optimizer {key} must be a string, got {opt[key]!r}")
    opt.setdefault("name", opt.get("label"))
    opt.setdefault("label", opt["name"])
    model, train = sections["model"], sections["train"]
    if model.get("ffn_width") is not None:
        model["ffn_width"] = _positive_int(model["ffn_width"], "ffn_width")
    else:
        model.pop("ffn_width", None)
    train["seed"] = _positive_int(train.get("seed", 0), "seed", allow_zero=True)
    if train.get("steps") is not None:
        train["steps"] = _positive_int(train["steps"], "steps")
    else:
        train.pop("steps", None)
    if not isinstance(cfg["name"], str) or not cfg["name"]:
        raise RunConfigError(f"run_config name must be a non-empty string, got {cfg['name']!r}")
    cfg.update(model=model, optimizer=opt, train=train)
    try:
        json.dumps(cfg, default=_plain)
    except (TypeError, ValueError) as exc:
        raise RunConfigError(f"run_config must hold JSON values (numbers, strings, lists, dicts): {exc}") from None
    return cfg


def _plain(o: Any) -> Any:
    # what RunDir writes besides plain JSON: NumPy/torch scalars, tuples, sets
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not a JSON value")


def resolve_config(config: Mapping[str, Any], *, final_step: Any, dims: list[int]) -> dict[str, Any]:
    """A run's config with what the analysis needs filled in from the run itself.

    ``model.ffn_width`` absent: the measured FFN dimension (``dims``: the distinct
    ``dim`` values of its spectra rows; exactly one is needed). ``train.steps``
    absent: the step its status ends at. ``optimizer`` given as a string: its name.
    A ``ValueError`` says what cannot be resolved.
    """
    version = config.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"config.json has format_version {version!r}; this capscale reads {FORMAT_VERSION}")
    out = dict(config)
    opt = out.get("optimizer")
    if isinstance(opt, str):
        out["optimizer"] = {"name": opt}
    model = dict(out.get("model") or {})
    if model.get("ffn_width") is None:
        if len(dims) != 1:
            raise ValueError(
                "config.json gives no model.ffn_width and the spectra hold "
                + (f"several dims {sorted(dims)}" if dims else "no dim")
                + ": say the FFN width in config.json"
            )
        model["ffn_width"] = int(dims[0])
        out["ffn_width_source"] = "measured"  # outside "model": it must not split compatible runs
    out["model"] = model
    train = dict(out.get("train") or {})
    if train.get("steps") is None and final_step is not None:
        train["steps"] = int(final_step)
    out["train"] = train
    return out
