"""The telemetry config: what the harness's ``[telemetry]`` table holds and ``attach`` takes.

One dataclass for both, so a run config reaches the probe without copying fields by hand:
``attach(model, cfg.telemetry, freq_table=..., sinks=...)``. It lives here, below the
harness (train imports probe, never the reverse), and checks each value's type as a config
file can give it, refusing a bad one in one line naming the key.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

GemmDtype = Literal["float32", "float64"]  # the probe's per-batch covariance GEMM
Site = Literal["pre", "post"]
Background = Literal["device", "host"]
StateLayout = Literal["auto", "device", "host"]  # where the probe's float64 states live
SpectrumMethod = Literal["auto", "exact", "lanczos", "hard-only"]  # how ranks are computed


def _matches(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the annotated type ``kind`` (as a config file can give it)."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        return any(_matches(value, k) for k in get_args(kind))
    if origin is Literal:
        return isinstance(value, str) and value in get_args(kind)
    if origin is tuple:
        item = get_args(kind)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # booleans are ints to Python, not to a config
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def _describe(kind: Any) -> str:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(k) for k in get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(kind))
    if origin is tuple:
        return f"a list of ({_describe(get_args(kind)[0])})"
    if origin is dict or kind is dict:
        return "a table/mapping"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def check_types(obj: Any, section: str) -> None:
    """Refuse, in one line naming the key, a field whose value does not have its annotated type."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ValueError(f"{section}.{f.name} must be {_describe(hints[f.name])}, got {value!r}")


def check_at_least(section: str, obj: Any, names: tuple[str, ...], lo: int) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < lo:
            raise ValueError(f"{section}.{name} must be >= {lo}, got {value!r}")


@dataclass
class TelemetryConfig:
    """What to measure and how: the harness's ``[telemetry]`` table, and ``attach``'s ``config``.

    ``buckets`` uses the frequency table given to ``attach`` (pooled only when false);
    ``enabled`` false means attach nothing (``attach`` refuses such a config).
    """

    enabled: bool = True
    every: int = 50  # full measurement cadence (steps)
    window: int = 1  # consecutive steps accumulated per measurement
    sites: tuple[Site, ...] = ("pre", "post")
    buckets: bool = True
    monitor_every: int | None = None  # cheap hard-rank monitoring cadence (None = off)
    dtype: GemmDtype | None = None  # per-batch covariance GEMM dtype (None: the activations'); states are float64
    # decompose finished windows on a worker thread (rows identical; not part of a run's identity):
    # false, true (= "device": snapshot on the activations' device) or "host" (snapshot in host memory)
    background: bool | Background = False
    # where the float64 states live (not part of a run's identity: the numbers are the same):
    # "device", "host" (bounded device memory: one D×D GEMM buffer) or "auto" (by free device memory)
    states: StateLayout = "auto"
    # how ranks are computed: "exact" (eigvalsh), "lanczos" (SLQ, soft rank ± its standard error,
    # no eigenvalues), "hard-only" (tr(C)²/‖C‖²_F) or "auto" (exact where it fits in host memory)
    spectrum: SpectrumMethod = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.sites, list):  # TOML/JSON give lists
            self.sites = tuple(self.sites)
        check_types(self, "telemetry")
        check_at_least("telemetry", self, ("every", "window", "monitor_every"), 1)
        if self.window > self.every:
            raise ValueError(f"telemetry.window ({self.window}) must not exceed telemetry.every ({self.every})")
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ValueError(f"telemetry.sites must be a non-empty list of distinct sites, got {list(self.sites)}")


# attach's own defaults where no config is given: a measurement every 200 steps (the
# harness's table measures every 50 of its shorter runs); the rest are the table's.
ATTACH_DEFAULTS = {"every": 200}
TELEMETRY_FIELDS = tuple(f.name for f in fields(TelemetryConfig))
