"""Plain JSON values from analysis frames: the one conversion every part of ``report.json`` uses."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf and missing values become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


def records(df: pd.DataFrame, columns: list[str] | None = None) -> list[dict]:
    if columns is not None:
        df = df[[c for c in columns if c in df.columns]]
    return jsonable(df.to_dict(orient="records"))
