"""Load run directories (the train → analysis contract) into tidy pandas frames.

A run directory holds ``config.json``, ``metrics.jsonl``, ``spectra.parquet`` and
``status.json`` (the format of ``docs/run-format.md``, whatever wrote it); a sweep
directory holds ``runs/<run_name>/`` and, optionally, ``sweep.json``; any other
directory is searched for run directories at any depth. A run whose config does not
say its FFN width is analysed at its measured width (the ``dim`` of its spectra). Only runs whose status is ``done`` are analysed; every other run
(running, failed, diverged, unreadable) is *recorded* in ``Sweep.excluded`` with
its reason so the report can list it — one bad run never stops an analysis.

A **series** is the set of runs that share everything except the FFN width and
the seed: the optimizer label, the step budget and, when they vary within the
analysis, the declared architecture axes (``ARCH_AXES``). Any other difference
between the model configs of the analysed runs is an error
(``IncompatibleRunsError``): their ranks would not be comparable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from capscale.analysis.validate import (
    InvalidRunError,
    check_config,
    check_metrics,
    check_spectra_schema,
    check_spectra_values,
    check_status,
)
from capscale.rundir import CONFIG_FILE, METRICS_FILE, STATUS_FILE, RunDir, RunStatus, spectra_parts
from capscale.runformat import resolve_config

# Model keys that may vary within one analysis and then become part of the series key.
ARCH_AXES = ("activation", "pos", "variant", "d_model", "n_head", "n_layer")
# Model keys that legitimately vary: the width itself (ffn_mult is resolved into ffn_width).
_WIDTH_KEYS = ("ffn_width", "ffn_mult")
# Spectra columns the analysis needs; the rest of ``spectrum_summary`` is kept when present.
REQUIRED_SPECTRA_COLUMNS = (
    "step",
    "layer",
    "site",
    "bucket",
    "soft_rank",
    "hard_rank",
    "dim",
    "sampling_status",
    "samples_per_dim",
)
_VAL_LOSS_KEYS = ("val_loss", "val_loss_head", "val_loss_mid", "val_loss_tail")


class NoFinishedRunsError(ValueError):
    """The input holds no run with status ``done`` and readable results."""


class IncompatibleRunsError(ValueError):
    """The runs of one analysis differ in more than width, seed and the declared axes."""


@dataclass(frozen=True)
class Sweep:
    """The analysable content of a sweep (or of a list of run directories).

    ``runs``: one row per analysed run (``run_id`` = directory name, unique) with its
    series key, width, seed and final validation losses. ``excluded``: one row per
    run that was not analysed, with ``status`` and ``reason``. ``spectra`` and
    ``metrics``: the runs' files, tidy, keyed by ``run_id`` (eigenvalue lists are
    not loaded: no analysis needs them). ``arch_axes``: the architecture axes that
    vary and are therefore part of the series key.
    """

    root: Path | None
    spec: dict[str, Any] | None
    runs: pd.DataFrame
    excluded: pd.DataFrame
    spectra: pd.DataFrame
    metrics: pd.DataFrame
    arch_axes: tuple[str, ...]

    @property
    def name(self) -> str:
        if self.spec and self.spec.get("name"):
            return str(self.spec["name"])
        return self.root.name if self.root is not None else "runs"


def load_sweep(source: str | Path | Iterable[str | Path]) -> Sweep:
    """Read a sweep directory, a single run directory, or a list of run directories."""
    root, spec, run_dirs, skipped = _locate(source)
    for entry in skipped:  # listed with the excluded runs, named by their path below the root
        if root is not None and Path(entry["path"]).is_relative_to(root):
            entry["run_id"] = Path(entry["path"]).relative_to(root).as_posix()
    included, spectra, metrics = [], [], []
    excluded: list[dict] = list(skipped)
    for run_dir in run_dirs:
        rec = _read_run(run_dir, _run_id(run_dir, root))
        for part, why in rec.pop("damaged", None) or []:
            where = Path(rec["path"]) / part
            excluded.append(
                _skip(where, f"damaged spectra part, left out ({why}); the run's other windows are analysed")
            )
            excluded[-1].update(status="damaged", run_id=f"{rec['run_id']}/{part}")
        if rec["reason"] is None:
            included.append(rec)
            spectra.append(rec.pop("spectra"))
            metrics.append(rec.pop("metrics"))
        else:
            rec.pop("spectra", None)
            rec.pop("metrics", None)
            excluded.append(rec)
    excluded_df = _excluded_frame(excluded)
    if not included:
        summary = ", ".join(f"{s}: {n}" for s, n in excluded_df["status"].value_counts().items()) or "none found"
        where = str(root) if root is not None else "the given run directories"
        reasons = "; ".join(f"{r['run_id']}: {r['reason']}" for r in excluded[:3]) + (
            "; ..." if len(excluded) > 3 else ""
        )
        raise NoFinishedRunsError(
            f"no finished runs to analyse in {where} ({len(excluded)} run(s); {summary}); "
            "a run is analysed once its status.json says 'done' and its spectra.parquet is readable"
            + (f" — {reasons}" if reasons else "")
        )
    arch_axes = _check_compatible(included)
    runs = _runs_frame(included, arch_axes)
    return Sweep(
        root=root,
        spec=spec,
        runs=runs,
        excluded=excluded_df,
        spectra=pd.concat(spectra, ignore_index=True),
        metrics=pd.concat(metrics, ignore_index=True),
        arch_axes=arch_axes,
    )


# -- locating and reading ---------------------------------------------------------


def _locate(source) -> tuple[Path | None, dict | None, list[Path], list[dict]]:
    """(root, sweep.json, run directories, skipped entries). Directory symlinks are never
    followed out of the root or into a loop, and every run is counted once, by its real path."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such sweep or run directory: {path}")
        if (path / "runs").is_dir():
            walk = _Walk(path)
            spec = None
            if (path / "sweep.json").exists():
                try:
                    spec = _read_spec(path / "sweep.json")
                except (OSError, ValueError) as exc:  # the runs are still analysable, with the defaults
                    why = " ".join(str(exc).split())
                    walk.skipped.append(_skip(path / "sweep.json", f"{why}; its analysis defaults are not used"))
            dirs = walk.children(path / "runs", runs_only=True)
            return path, spec, dirs, walk.skipped
        if _is_run_dir(path):
            return None, None, [path], []
        walk = _Walk(path)
        dirs = walk.find(path)
        if not dirs:
            raise FileNotFoundError(
                f"{path} is neither a sweep directory (with runs/) nor a run directory (with config.json), "
                "and holds no run directory below it"
                + (f" ({len(walk.skipped)} entr(y/ies) skipped: {walk.skipped[0]['reason']})" if walk.skipped else "")
            )
        return path, None, dirs, walk.skipped
    dirs = [Path(p) for p in source]
    missing = [str(p) for p in dirs if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"run directories not found: {missing}")
    if len({p.name for p in dirs}) != len(dirs):
        raise ValueError("run directories must have distinct names (the name identifies the run)")
    unique, skipped, seen = [], [], {}
    for p in dirs:
        real = os.path.realpath(p)
        if real in seen:
            skipped.append(_skip(p, f"the same directory as {seen[real]}"))
        else:
            seen[real] = p
            unique.append(p)
    return None, None, unique, skipped


def _read_spec(path: Path) -> dict:
    spec = _read_json(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(spec).__name__} ({spec!r:.40})")
    for key, kind in (("name", str), ("analysis", dict)):
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise ValueError(
                f"{path}: {key} must be a {'string' if kind is str else 'JSON object'}, got {spec[key]!r:.40}"
            )
    return spec


def _is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).exists() or (path / STATUS_FILE).exists()


def _skip(path: Path, reason: str) -> dict:
    rec = {"run_id": str(path), "path": str(path), "name": path.name, "status": "skipped", "reason": reason}
    return {**rec, "step": None, "config": None}


class _Walk:
    """The directories below a root, each real directory once; directory symlinks are followed
    only to a directory inside the root that the walk has not reached by its real path."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)
        self.seen: dict[str, Path] = {self.root: root}
        self.skipped: list[dict] = []
        self._links: list[Path] = []

    def _admit(self, sub: Path) -> bool:
        real = os.path.realpath(sub)
        if sub.is_symlink():
            if os.path.commonpath([real, self.root]) != self.root:
                self.skipped.append(_skip(sub, f"a symlink to {real}, outside the root {self.root}: not followed"))
                return False
            if real in self.seen or any(os.path.commonpath([real, s]) == real for s in self.seen if s != real):
                # a link to a directory already walked, or to one of its ancestors (a loop)
                where = self.seen.get(real)
                self.skipped.append(
                    _skip(
                        sub,
                        f"a symlink to {where if where is not None else real}, inside the walk already: not followed",
                    )
                )
                return False
        elif real in self.seen:
            self.skipped.append(_skip(sub, f"the same directory as {self.seen[real]}: counted once"))
            return False
        self.seen[real] = sub
        return True

    def _subdirs(self, folder: Path) -> list[Path]:
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            self.skipped.append(_skip(folder, f"cannot be listed: {exc.strerror}"))
            return []
        # real directories first: a run reached both directly and through a link is counted as itself
        dirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
        self._links += [p for p in entries if p.is_dir() and p.is_symlink()]
        return dirs

    def children(self, folder: Path, runs_only: bool = False) -> list[Path]:
        """The directories directly in ``folder`` (a sweep's runs/), links last."""
        self.seen.setdefault(os.path.realpath(folder), folder)
        found = [p for p in self._subdirs(folder) if self._admit(p)]
        links, self._links = self._links, []
        found += [p for p in links if self._admit(p)]
        return found

    def find(self, root: Path) -> list[Path]:
        """Run directories at any depth (a run's own subdirectories are not searched)."""
        found = self._find(root)
        while self._links:
            links, self._links = sorted(self._links), []
            for link in links:
                if self._admit(link):
                    found += [link] if _is_run_dir(link) else self._find(link)
        return found

    def _find(self, folder: Path) -> list[Path]:
        found = []
        for sub in self._subdirs(folder):
            if sub.name.startswith(".") or not self._admit(sub):
                continue
            if _is_run_dir(sub):
                found.append(sub)
            else:
                found += self._find(sub)
        return found


def _run_id(run_dir: Path, root: Path | None) -> str:
    # Found at any depth, runs are named by their path below the root: names stay unique.
    if root is not None and run_dir.parent != root / "runs":
        try:
            return run_dir.relative_to(root).as_posix()
        except ValueError:
            pass
    return run_dir.name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _read_run(run_dir: Path, run_id: str | None = None) -> dict[str, Any]:
    """One run's record; ``reason`` is None when it can be analysed."""
    rec: dict[str, Any] = {
        "run_id": run_id or run_dir.name,
        "path": str(run_dir),
        "name": run_dir.name,
        "status": "unknown",
        "reason": None,
        "step": None,
        "config": None,
    }
    run = RunDir(run_dir)
    try:
        status = run.read_status()
        config = run.read_config()
        if status is not None:
            check_status(status, STATUS_FILE)
        if config is not None:
            check_config(config, CONFIG_FILE)
    except (OSError, ValueError) as exc:
        rec["reason"] = " ".join(str(exc).split())
        return rec
    if config is not None:
        rec["config"] = config
        rec["name"] = str(config.get("name", run_dir.name))
    if status is None:
        rec["reason"] = "no status.json (not started, or not a run directory)"
        return rec
    rec["status"] = str(status.get("status", "unknown"))
    rec["step"] = status.get("step")
    if rec["status"] != RunStatus.DONE:
        detail = status.get("reason")
        rec["reason"] = (
            f"{rec['status']}"
            + (f": {detail}" if detail else "")
            + (" (unfinished)" if rec["status"] == RunStatus.RUNNING else "")
        )
        return rec
    if config is None:
        rec["reason"] = "done, but config.json is missing"
        return rec
    try:
        rec["spectra"], rec["damaged"] = _read_spectra(run, rec["run_id"])
        dims = sorted(int(d) for d in rec["spectra"]["dim"].dropna().unique())
        rec["config"] = config = resolve_config(config, final_step=rec["step"], dims=dims)
        check_config(config, CONFIG_FILE)
        _config_fields(config)
        rec["metrics"] = _read_metrics(run, rec["run_id"])
        rec["final"] = _final_losses(rec["metrics"])
    except KeyError as exc:
        rec["reason"] = f"done, but config.json lacks the key {exc}"
    except InvalidRunError as exc:
        rec["reason"] = f"done, but invalid: {exc}"
    except (OSError, ValueError) as exc:
        rec["reason"] = f"done, but unreadable: {exc}"
    except Exception as exc:  # noqa: BLE001 — one bad run never stops an analysis; its line says what
        rec["reason"] = f"done, but unreadable: {type(exc).__name__}: {exc}"
    if rec["reason"]:
        rec["reason"] = " ".join(str(rec["reason"]).split())  # one line, whatever the library said
    return rec


def _read_spectra(run: RunDir, run_id: str) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The run's spectra, every file or part validated (types, then ranges: ``InvalidRunError``
    names it); a part that cannot be read at all is left out and returned as (name, why), so
    the run's other windows are analysed."""
    import pyarrow.parquet as pq

    path = run.spectra_path
    if not path.exists():
        raise FileNotFoundError(f"{path.name} is missing")
    files = [(path.name, path)] if path.is_file() else [(f"{path.name}/{p.name}", p) for _, _, p in spectra_parts(path)]
    frames, damaged, columns = [], [], []
    for label, file in files:
        try:
            schema = pq.read_schema(file)
            check_spectra_schema(schema, label)
            # Lazily: every column but the eigenvalue lists, which no analysis needs.
            names = [c for c in schema.names if c != "eigenvalues"]
            frame = pq.read_table(file, columns=names).to_pandas()
        except InvalidRunError:
            raise
        except (OSError, ValueError) as exc:  # not Parquet, truncated, unreadable
            damaged.append((label, " ".join(str(exc).split()) or type(exc).__name__))
            continue
        check_spectra_values(frame, label)
        columns += [c for c in names if c not in columns]
        frames.append(frame)
    if not frames:
        raise ValueError(
            f"{path.name} has no readable part" + (f" ({damaged[0][0]}: {damaged[0][1]})" if damaged else "")
        )
    missing = [c for c in REQUIRED_SPECTRA_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{path.name} lacks column(s) {missing}")
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if df.empty:
        raise ValueError(f"{path.name} has no rows")
    if "stack" not in df.columns:  # written before the stack column: one stack
        df["stack"] = ""
    df["stack"] = df["stack"].fillna("")
    # A run resumed from a checkpoint may record a window again: the later record wins.
    df = df.drop_duplicates(["step", "stack", "layer", "site", "bucket"], keep="last")
    df.insert(0, "run_id", run_id)
    return df, damaged


def _read_metrics(run: RunDir, run_id: str) -> pd.DataFrame:
    """metrics.jsonl by the run directory's one rule: a torn last line is dropped (with a logged
    warning) and the complete records before it stand; a damaged line elsewhere excludes the run."""
    records = run.read_metrics()
    check_metrics(records, METRICS_FILE)
    df = pd.DataFrame(records)
    if df.empty:
        df = pd.DataFrame({"step": pd.Series(dtype="int64")})
    if "step" not in df.columns:
        raise ValueError(f"{run.metrics_path.name} rows lack 'step'")
    df = df.drop_duplicates("step", keep="last")  # re-logged after a resume: the later record wins
    df.insert(0, "run_id", run_id)
    return df


def _section(config: dict, name: str) -> dict:
    value = config[name]
    if not isinstance(value, dict):
        raise ValueError(f"config {name} must be a table (a JSON object), got {value!r}")
    return value


def _int_field(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _config_fields(config: dict) -> dict[str, Any]:
    """The config fields the analysis uses; a KeyError names what is missing, a ValueError what is malformed."""
    model, opt, train = _section(config, "model"), _section(config, "optimizer"), _section(config, "train")
    width = _int_field(model["ffn_width"], "model.ffn_width", 1)
    return {
        "label": str(opt.get("label") or opt["name"]),
        "optimizer": str(opt["name"]),
        "steps": _int_field(train["steps"], "train.steps", 1),
        "seed": _int_field(train.get("seed", 0), "train.seed", 0),
        "width": width,
        "d_model": model.get("d_model"),
        "tokens_per_step": train.get("batch_size", 0) * model.get("seq_len", 0) or None,  # β against tokens seen
        **{axis: model.get(axis) for axis in ARCH_AXES},
    }


# -- validation and frames ---------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)  # hashable, comparable
    return out


def _differences(records: list[dict], section: str, ignore: Iterable[str]) -> dict[str, list[tuple[str, Any]]]:
    """Keys of ``config[section]`` that differ between records → [(run, value), ...] examples."""
    flat = [(r["run_id"], _flatten(r["config"].get(section, {}))) for r in records]
    keys = sorted({k for _, f in flat for k in f} - set(ignore))
    diffs = {}
    for key in keys:
        seen: dict[str, str] = {}
        for run_id, f in flat:
            seen.setdefault(f.get(key, "<absent>"), run_id)
        if len(seen) > 1:
            diffs[key] = [(run_id, value) for value, run_id in seen.items()]
    return diffs


def _describe(diffs: dict[str, list[tuple[str, Any]]], section: str) -> str:
    parts = []
    for key, examples in diffs.items():
        shown = ", ".join(f"{value} in {run_id!r}" for run_id, value in examples[:3])
        parts.append(f"{section}.{key} ({shown}{', ...' if len(examples) > 3 else ''})")
    return "; ".join(parts)


def _check_compatible(records: list[dict]) -> tuple[str, ...]:
    """Raise on incompatible model configs; return the architecture axes that vary."""
    diffs = _differences(records, "model", _WIDTH_KEYS)
    bad = {k: v for k, v in diffs.items() if k not in ARCH_AXES}
    if bad:
        raise IncompatibleRunsError(
            f"mixed incompatible configs: the runs' model configs differ in {sorted(bad)} — "
            f"{_describe(bad, 'model')}. Only model.ffn_width (and the architecture axes "
            f"{list(ARCH_AXES)}) may vary within one analysis; analyse these runs separately."
        )
    arch_axes = tuple(a for a in ARCH_AXES if a in diffs)
    # One label must name one optimizer setting, or its series would mix settings.
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(_config_fields(r["config"])["label"], []).append(r)
    for label, recs in by_label.items():
        odiffs = _differences(recs, "optimizer", ("label",))
        if odiffs:
            raise IncompatibleRunsError(
                f"optimizer label {label!r} names different optimizer settings: {_describe(odiffs, 'optimizer')}; "
                "give each setting its own optimizer.label"
            )
    return arch_axes


def _final_losses(metrics: pd.DataFrame) -> dict[str, float]:
    out = {}
    for key in _VAL_LOSS_KEYS:
        col = metrics[key].dropna() if key in metrics.columns else pd.Series(dtype=float)
        out[f"final_{key}"] = float(col.iloc[-1]) if len(col) else math.nan
    return out


def run_keys(configs: Mapping[str, dict]) -> pd.DataFrame:
    """Series key, width and seed of runs given as ``{run_id: config}``, named as ``load_sweep`` names them.

    Needs only the configs, not telemetry: a post-hoc measurement of checkpoints joins the
    report's series through it. The configs are checked for compatibility as in ``load_sweep``;
    the series names depend on the whole set (a step budget or an architecture axis is
    named only where it varies), so pass the same runs the report analyses.
    """
    if not configs:
        raise ValueError("run_keys needs at least one run config")
    records = [{"run_id": run_id, "config": config} for run_id, config in configs.items()]
    runs = pd.DataFrame([{"run_id": r["run_id"], **_config_fields(r["config"])} for r in records])
    _name_series(runs, _check_compatible(records))
    return runs.sort_values(["series", "width", "seed", "run_id"], ignore_index=True)


def _runs_frame(records: list[dict], arch_axes: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for r in records:
        f = _config_fields(r["config"])
        rows.append(
            {"run_id": r["run_id"], "name": r["name"], **f, **r["final"], "status": r["status"], "path": r["path"]}
        )
    runs = pd.DataFrame(rows)
    _name_series(runs, arch_axes)
    return runs.sort_values(["series", "width", "seed", "run_id"], ignore_index=True)


def _name_series(runs: pd.DataFrame, arch_axes: tuple[str, ...]) -> None:
    """Add ``setting``, ``arch`` and ``series`` columns (in place) from label, steps and the arch axes."""
    budgets = runs.groupby("label")["steps"].nunique()
    # A run's optimizer "setting": its label, plus its step budget where the label has several.
    runs["setting"] = [
        f"{lab} · {steps} steps" if budgets[lab] > 1 else lab for lab, steps in zip(runs["label"], runs["steps"])
    ]
    runs["arch"] = [" · ".join(f"{a}={row[a]}" for a in arch_axes) for _, row in runs.iterrows()]
    runs["series"] = [s if not a else f"{s} · {a}" for s, a in zip(runs["setting"], runs["arch"])]


def _excluded_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {k: r[k] for k in ("run_id", "name", "status", "reason", "step", "path")}
        try:
            f = _config_fields(r["config"]) if r["config"] is not None else {}
        except (KeyError, ValueError, TypeError):
            f = {}
        row.update(label=f.get("label"), width=f.get("width"), seed=f.get("seed"), steps=f.get("steps"))
        rows.append(row)
    cols = ["run_id", "name", "status", "reason", "step", "label", "width", "seed", "steps", "path"]
    return pd.DataFrame(rows, columns=cols)
