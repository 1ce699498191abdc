"""Read-time validation of every run-directory field the analysis uses (docs/run-format.md).

Each check raises ``InvalidRunError`` (a ``ValueError``) whose one line names the file, the
field and the offending value; ``load_sweep`` then lists the run as not analysed and goes
on with the others. Types are checked as JSON or Arrow gives them: an integer field holds
an integer (not ``"8"``, not ``8.0``, not ``true``), a number is an int or a float, a text
field is a string; ranges where a value has one (a rank is ≥ 0 or NaN, a width ≥ 1).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

# Seeds beyond a signed 64-bit integer are no seed any generator takes.
MAX_SEED = 2**63 - 1
# config.json: (section, key) → minimum, for the integer fields the analysis reads.
CONFIG_INTS = {
    ("model", "ffn_width"): 1,
    ("model", "d_model"): 1,
    ("model", "n_head"): 1,
    ("model", "seq_len"): 1,
    ("train", "batch_size"): 1,
    ("train", "steps"): 1,
    ("train", "seed"): 0,
}
CONFIG_STRINGS = (("optimizer", "name"), ("optimizer", "label"))
# spectra columns: kind ("int", "float", "str") and minimum (None: no range).
SPECTRA_COLUMNS = {
    "step": ("int", 0),
    "layer": ("int", 0),
    "dim": ("int", 1),
    "site": ("str", None),
    "bucket": ("str", None),
    "stack": ("str", None),
    "sampling_status": ("str", None),
    "soft_rank": ("float", 0.0),
    "hard_rank": ("float", 0.0),
    "samples_per_dim": ("float", 0.0),
}
# metrics.jsonl: numbers the report reads (null allowed: a diverged loss is written as null).
METRIC_NUMBERS = ("loss", "lr", "tokens_per_s", "val_loss", "val_loss_head", "val_loss_mid", "val_loss_tail")


class InvalidRunError(ValueError):
    """A run-directory field of the wrong type or range; the message names file, field and value."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad(file: str, field: str, expected: str, value: Any) -> InvalidRunError:
    return InvalidRunError(f"{file}: {field} must be {expected}, got {_show(value)}")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_config(config: Mapping[str, Any], file: str = "config.json") -> None:
    """Sections are objects; the integer, text and architecture fields have their types and ranges."""
    for section in ("model", "optimizer", "train"):
        value = config.get(section)
        if value is None or (section == "optimizer" and isinstance(value, str)):
            continue
        if not isinstance(value, Mapping):
            raise bad(file, section, "a JSON object", value)
    if "format_version" in config and not is_int(config["format_version"]):
        raise bad(file, "format_version", "an integer", config["format_version"])
    if "name" in config and not isinstance(config["name"], str):
        raise bad(file, "name", "a string", config["name"])
    for (section, key), minimum in CONFIG_INTS.items():
        table = config.get(section)
        value = table.get(key) if isinstance(table, Mapping) else None
        if value is None:
            continue
        top = MAX_SEED if key == "seed" else None
        if not is_int(value) or value < minimum or (top is not None and value > top):
            rng = f"an integer >= {minimum}" + (" and <= 2**63 - 1" if top else "")
            raise bad(file, f"{section}.{key}", rng, value)
    opt = config.get("optimizer")
    if isinstance(opt, Mapping):
        for section, key in CONFIG_STRINGS:
            if opt.get(key) is not None and not isinstance(opt[key], str):
                raise bad(file, f"{section}.{key}", "a string", opt[key])
    model = config.get("model")
    if isinstance(model, Mapping):
        from capscale.analysis.runs import ARCH_AXES

        for axis in ARCH_AXES:
            value = model.get(axis)
            if value is not None and not isinstance(value, (str, numbers.Real)):
                raise bad(file, f"model.{axis}", "a string or a number", value)


def check_status(status: Mapping[str, Any], file: str = "status.json") -> None:
    reason = status.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise bad(file, "reason", "a string or null", reason)


def check_metrics(records: list[dict], file: str = "metrics.jsonl") -> None:
    """Every record has an integer ``step`` >= 0; the numbers the report reads are numbers or null."""
    for i, rec in enumerate(records, start=1):
        step = rec.get("step")
        if not is_int(step) or step < 0:
            raise bad(f"{file} record {i}", "'step'", "an integer >= 0", step)
        for key in METRIC_NUMBERS:
            value = rec.get(key)
            if value is not None and not is_number(value):
                raise bad(f"{file} record {i} (step {step})", repr(key), "a number or null", value)


def check_spectra_schema(schema, file: str) -> None:
    """The Arrow types of one spectra file or part: integer, floating and text columns as the format says."""
    import pyarrow as pa

    for name, (kind, _) in SPECTRA_COLUMNS.items():
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        ok = {
            "int": pa.types.is_integer(t),
            "float": pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t),
            "str": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t),
        }[kind]
        if not ok:
            expected = {"int": "integers", "float": "numbers", "str": "strings"}[kind]
            raise InvalidRunError(f"{file}: column {name!r} must hold {expected}, holds {t}")


def check_spectra_values(frame: pd.DataFrame, file: str) -> None:
    """Ranges of one part's rows: ranks and N/D >= 0 or NaN (never ±inf), dims >= 1, steps and layers >= 0."""
    for name, (kind, minimum) in SPECTRA_COLUMNS.items():
        if minimum is None or name not in frame.columns:
            continue
        col = frame[name]
        values = col.to_numpy(dtype=np.float64, na_value=np.nan) if kind == "float" else col.to_numpy()
        if kind == "int":
            badmask = pd.isna(col).to_numpy() | (values < minimum)
        else:
            badmask = np.isinf(values) | (values < minimum)
        if badmask.any():
            value = col[badmask].iloc[0]
            expected = f"{'an integer' if kind == 'int' else 'a number'} >= {minimum:g}" + (
                " or NaN" if kind == "float" else ""
            )
            raise bad(file, f"column {name!r}", expected, value.item() if hasattr(value, "item") else value)


def finite_or_nan(value: Any) -> float:
    """A float for a number, NaN for anything else (None included)."""
    return float(value) if is_number(value) and math.isfinite(float(value)) else math.nan
