"""The Probe: hooks on the FFN sites, a step schedule, accumulation and hand-off to sinks.

Outside measured steps a probe costs nothing: by default its hooks are only
registered while a measurement window is open (``persistent_hooks=False``),
so an unmeasured forward runs exactly the model's own code. Under
``torch.compile`` hooks must exist before compilation and must not change
afterwards (dynamo does not guard on hook dicts), so a compiled model gets
persistent hooks that run eagerly (``torch.compiler.disable``) and return at
once when no window is open.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from capscale.probe import distributed
from capscale.probe.accumulate import (
    Forward,
    Moments,
    Scratch,
    WindowMoments,
    accumulate,
    compute_dtype,
)
from capscale.probe.records import (
    SpectrumError,
    add_js_divergence,
    monitor_summary,
    scalar_summary,
    spectrum_rows,
    to_frame,
)
from capscale.probe.schedule import Schedule
from capscale.probe.sinks import Sink
from capscale.probe.sites import SITE_NAMES, Site, discover_sites
from capscale.spectrum import BUCKETS, FrequencyTable, hard_rank_from_covariance

MODES = ("train", "eval", "any")
# Background windows whose snapshots may wait for the worker before a window close blocks.
_MAX_PENDING = 2
MONITOR_COLUMNS = ("step", "layer", "site", "module", "n_samples", "dim", "hard_rank", "trace")


@dataclass
class _Window:
    """One open measurement: states per site index, and how many forwards it captured."""

    start: int
    end: int
    states: dict[int, Any] = field(default_factory=dict)
    forwards: int = 0


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    table = {
        "float32": torch.float32,
        "float64": torch.float64,
        torch.float32: torch.float32,
        torch.float64: torch.float64,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be None, float32 or float64 (the covariance GEMM dtype), got {dtype!r}")
    return table[dtype]


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


class Probe:
    """Spectral telemetry on one model; make one with :func:`capscale.attach`."""

    def __init__(
        self,
        model: nn.Module,
        sites: list[Site],
        *,
        schedule: Schedule,
        monitor: Schedule | None,
        full_sites: Iterable[str],
        monitor_sites: Iterable[str],
        freq_table: FrequencyTable | None,
        dtype: torch.dtype | None,
        device,
        sinks: Iterable[Sink],
        mode: str,
        root: nn.Module,
        keep: bool,
        group,
        persistent_hooks: bool,
        start_step: int,
        background: bool | str = False,
    ):
        self.model, self.sites, self.schedule, self.monitor = model, sites, schedule, monitor
        self.freq_table, self.dtype, self.mode, self.keep = freq_table, dtype, mode, keep
        # Resolved through a tensor: "cuda" becomes "cuda:0", as the states' own device.
        self.device = None if device is None else torch.empty(0, device=device).device
        self.sinks, self.group, self._root = list(sinks), group, root
        self.persistent_hooks = persistent_hooks
        full_sites, monitor_sites = set(full_sites), set(monitor_sites)
        self._full_idx = [i for i, s in enumerate(sites) if s.site in full_sites]
        self._mon_idx = [i for i, s in enumerate(sites) if s.site in monitor_sites] if monitor else []
        self._full_set, self._mon_set = set(self._full_idx), set(self._mon_idx)
        self._dims = {i: s.feature_dim() for i, s in enumerate(sites)}
        self.step_index = int(start_step)
        self._full: _Window | None = None
        self._monitor: _Window | None = None
        self._records: list[dict] = []  # finished spectra rows; a DataFrame only when asked for
        self.monitor_records: list[dict] = []
        self._fwd: Forward | None = None
        self._explicit: tuple | None = None
        self._handles: list = []
        # Accumulators and scratch buffers are reused window after window.
        self._pool: dict[tuple[str, int], list[WindowMoments]] = {}
        self._scratch = {i: Scratch() for i in range(len(sites))}
        self._closed = False
        # Off the training path: finished windows are snapshotted and decomposed by one
        # worker thread; their rows reach the records and sinks, in order, at a later call.
        self.background = background
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="capscale-spectra") if background else None
        self._pending: deque = deque()
        if persistent_hooks:
            self._install()
        self._open_windows()
        self._sync_hooks()

    # -- public API -----------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while a measurement window is open (the current step is measured)."""
        return self._full is not None or self._monitor is not None

    @property
    def window_start(self) -> int | None:
        """Start step of the open full-measurement window, or None when none is open."""
        return None if self._full is None else self._full.start

    def step(self, step: int | None = None) -> Probe:
        """Advance to the next step (or to ``step``): closes finished windows, opens due ones.

        Call once per optimizer step; every forward in between (micro-batches
        included) belongs to the current step. Calling with the current step is a no-op.
        """
        self._check_open()
        new = self.step_index + 1 if step is None else int(step)
        if new < self.step_index:
            raise ValueError(f"steps only move forward: at step {self.step_index}, asked for {new}")
        if new == self.step_index:
            return self
        self.step_index = new
        self._explicit = None
        self._drain(wait=False)
        if self._full is not None and self._full.end <= new:
            self._finish_full()
        if self._monitor is not None and self._monitor.end <= new:
            self._finish_monitor()
        self._open_windows()
        self._sync_hooks()
        return self

    def batch(self, token_ids=None, mask=None) -> _BatchScope:
        """Token ids (for HEAD/MID/TAIL) and/or a padding mask (true = keep) for the next forwards.

        Each given value overrides what the root pre-hook would read from the
        model's inputs (``input_ids`` / first argument, ``attention_mask``) until
        the next ``step()``, the next ``batch()`` or the end of a ``with`` block.
        """
        self._check_open()
        ids = None if token_ids is None else torch.as_tensor(token_ids)
        if ids is not None and (ids.is_floating_point() or ids.dtype == torch.bool):
            raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
        m = None if mask is None else torch.as_tensor(mask)
        if m is not None:
            if ids is not None and tuple(m.shape) != tuple(ids.shape):
                raise ValueError(f"mask shape {tuple(m.shape)} != token_ids shape {tuple(ids.shape)}")
            m = m != 0
        buckets = self._bucket_ids(ids) if ids is not None and self.freq_table is not None else None
        self._explicit = (ids, m, buckets)
        return _BatchScope(self)

    def compute(self, reset: bool = True) -> pd.DataFrame:
        """Spectra rows of finished windows not yet returned, plus the open window so far.

        One row per (step, layer, site, bucket) with every ``spectrum_summary``
        field and the eigenvalues. ``reset`` drops the returned finished rows and
        restarts the open window's accumulation (labelled with the current step).
        Under torch.distributed every rank must call it (it reduces across ranks).
        """
        self._check_open()
        self._drain(wait=True)
        rows = list(self._records)
        if self._full is not None:
            rows += self._rows(self._full, release=reset)
            if reset:
                self._full = _Window(self.step_index, self._full.end)
        if reset:
            self._records = []
        return to_frame(rows)

    def monitor_frame(self, reset: bool = False) -> pd.DataFrame:
        """The monitoring level's records (hard rank from tr(C)²/‖C‖²_F, no eigendecomposition)."""
        df = pd.DataFrame(self.monitor_records, columns=list(MONITOR_COLUMNS))
        if reset:
            self.monitor_records = []
        return df

    def flush(self) -> None:
        """Finish the open windows now (e.g. at the end of training) and hand them to the sinks."""
        self._check_open()
        if self._full is not None:
            self._finish_full()
        if self._monitor is not None:
            self._finish_monitor()
        self._drain(wait=True)
        self._sync_hooks()

    def close(self, flush: bool = True) -> None:
        """Flush (optionally), remove every hook and close the sinks. Idempotent."""
        if self._closed:
            return
        try:
            if flush:
                self.flush()
        finally:
            self._remove()
            self._full = self._monitor = None
            self._closed = True
            if self._worker is not None:
                self._pending.clear()  # unflushed work (after an error) is dropped, as an open window is
                self._worker.shutdown(wait=True)
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an error the open window is incomplete: keep what was finished, drop it.
        self.close(flush=exc_type is None)

    def __repr__(self) -> str:
        layers = sorted({s.layer for s in self.sites})
        return (
            f"Probe(layers={layers}, sites={sorted({s.site for s in self.sites})}, "
            f"every={self.schedule.every}, window={self.schedule.window}, step={self.step_index}, "
            f"buckets={self.freq_table is not None}, active={self.active})"
        )

    # -- schedule ----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this probe is closed")

    def _open_windows(self) -> None:
        s = self.step_index
        if self._full is None and self._full_idx and self.schedule.starts_at(s):
            self._full = _Window(s, self.schedule.end(s))
        if self._monitor is None and self._mon_idx and self.monitor.starts_at(s):
            self._monitor = _Window(s, self.monitor.end(s))

    # -- hooks ---------------------------------------------------------------------
    def _sync_hooks(self) -> None:
        if self.persistent_hooks:
            return
        if self.active and not self._handles:
            self._install()
        elif not self.active and self._handles:
            self._remove()

    def _install(self) -> None:
        wrap = torch.compiler.disable if self.persistent_hooks else (lambda f: f)
        h = self._handles
        h.append(self._root.register_forward_pre_hook(wrap(self._on_root_pre), with_kwargs=True))
        h.append(self._root.register_forward_hook(wrap(self._on_root_post), always_call=True))
        for i, site in enumerate(self.sites):
            if site.capture == "output":

                def hook(module, args, output, i=i):
                    self._on_site(i, output[0] if isinstance(output, (tuple, list)) else output)

                h.append(site.module.register_forward_hook(wrap(hook)))
            else:

                def pre_hook(module, args, i=i):
                    self._on_site(i, args[0] if args else None)

                h.append(site.module.register_forward_pre_hook(wrap(pre_hook)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._fwd = None

    def _on_root_pre(self, module, args, kwargs) -> None:
        if not self.active:
            return
        capture = self.mode == "any" or (self.mode == "train") == module.training
        ids, mask = _ids_and_mask(args, kwargs)
        given_ids, given_mask, buckets = self._explicit or (None, None, None)
        if given_ids is not None:  # what probe.batch() gave wins over what the inputs hold
            ids = given_ids
        elif capture and self._full is not None and self.freq_table is not None and ids is not None:
            buckets = self._bucket_ids(ids)
        if given_mask is not None:
            mask = given_mask
        self._fwd = Forward(ids, mask, buckets, capture)
        if capture:
            for w in (self._full, self._monitor):
                if w is not None:
                    w.forwards += 1

    def _on_root_post(self, module, args, output) -> None:
        # Site hooks fire only inside a root forward: activation-checkpoint
        # recomputation during backward is not counted twice.
        self._fwd = None

    def _bucket_ids(self, ids: torch.Tensor) -> torch.Tensor:
        try:
            return self.freq_table.bucket(ids)
        except ValueError as exc:
            raise ValueError(f"token ids do not fit the frequency table: {exc}") from exc

    # -- accumulation -----------------------------------------------------------
    def _on_site(self, i: int, x) -> None:
        fwd = self._fwd
        if fwd is None or not fwd.capture:
            return
        full = self._full is not None and i in self._full_set
        mon = self._monitor is not None and i in self._mon_set
        if not (full or mon):
            return
        site = self.sites[i]
        if not (torch.is_tensor(x) and x.is_floating_point()):
            raise TypeError(f"{site.label}: expected a floating-point tensor, got {type(x).__name__}")
        d = int(x.shape[-1])
        known = self._dims[i]
        if known is None:
            self._dims[i] = d
        elif known != d:
            raise ValueError(f"{site.label}: activations have D={d}, expected {known}")
        if d < 2:
            raise ValueError(f"{site.label}: a spectrum needs D >= 2, got {d}")
        bucketed = full and self.freq_table is not None
        grouping = fwd.grouping(site, x.numel() // d, x.device, bucketed)
        dev = self.device or x.device
        seg_accs = pooled_acc = None
        if full:
            seg_accs = self._full.states.get(i)
            if seg_accs is None:
                seg_accs = self._full.states[i] = self._acquire("full", i, d, len(grouping.bounds) - 1, dev)
        if mon:
            accs = self._monitor.states.get(i)
            if accs is None:
                accs = self._monitor.states[i] = self._acquire("monitor", i, d, 1, dev)
            pooled_acc = accs[0]  # the pooled state: bucket moments merge into it exactly
        accumulate(
            x,
            grouping,
            compute_dtype(x.dtype, self.dtype),
            self._scratch[i],
            site,
            self.step_index,
            seg_accs,
            pooled_acc,
        )

    def _acquire(self, level: str, i: int, d: int, k: int, device) -> list[WindowMoments]:
        accs = self._pool.get((level, i))
        if accs is None or len(accs) != k or accs[0].scatter.device != torch.device(device):
            accs = self._pool[(level, i)] = [WindowMoments(d, device) for _ in range(k)]
        return accs

    # -- finishing windows ----------------------------------------------------------
    def _gather(self, window: _Window, idx: list[int], per_site: int) -> tuple[list[Moments | None], int]:
        """Moments of the window (``per_site`` per site), merged across ranks, and its forward count.

        Without distribution the moments share the accumulators' buffers: use
        them before ``_release``.
        """
        flat, dims = [], []
        for i in idx:
            accs = window.states.get(i)
            flat += [None] * per_site if accs is None else [a.moments() for a in accs]
            dims += [self._dims[i]] * per_site
        if distributed.world_size(self.group) > 1:
            flat, (forwards,) = distributed.reduce_moments(flat, dims, [float(window.forwards)], self.group)
            return flat, round(forwards)
        return [m if m is not None or d is None else self._empty(d) for m, d in zip(flat, dims)], window.forwards

    def _empty(self, d: int) -> Moments:
        """The state of a site or bucket that saw no rows in a window."""
        dev = self.device or torch.device("cpu")
        return Moments(
            0,
            torch.zeros(d, dtype=torch.float64, device=dev),
            torch.zeros(d, d, dtype=torch.float64, device=dev),
        )

    @staticmethod
    def _release(window: _Window) -> None:
        """Empty the window's accumulators for reuse by the next window."""
        for accs in window.states.values():
            for a in accs:
                a.reset()
        window.states.clear()

    def _states(self, window: _Window, release: bool, copy: str | None = None) -> tuple[int, list] | None:
        """The window's moments per full site, ``(start, [(site, parts), ...])``; None without forwards.

        ``copy``: None shares the accumulators' buffers (decompose before they are
        released); "device" or "host" snapshots them, so the accumulators can be released.
        """
        k = len(BUCKETS) if self.freq_table is not None else 1
        try:
            flat, forwards = self._gather(window, self._full_idx, k)
            if not forwards:
                return None
            out = []
            for j, i in enumerate(self._full_idx):
                parts = flat[j * k : (j + 1) * k]
                if any(p is None for p in parts):  # never saw data anywhere: width unknown
                    continue
                if copy == "host":
                    parts = [
                        Moments(p.count, p.mean.to("cpu", copy=True), p.scatter.to("cpu", copy=True)) for p in parts
                    ]
                elif copy == "device":
                    parts = [Moments(p.count, p.mean.clone(), p.scatter.clone()) for p in parts]
                out.append((self.sites[i], parts))
            return window.start, out
        finally:
            if release:
                self._release(window)

    @staticmethod
    def _decompose(start: int, states: list, bucketed: bool) -> list[dict]:
        """Spectra rows of one window's states (pools the buckets into "all"); runs on any thread."""
        entries = []
        for site, parts in states:
            named = (
                {"all": parts[0]} if not bucketed else {"all": Moments.merge_all(parts), **dict(zip(BUCKETS, parts))}
            )
            for bucket, m in named.items():
                labels = {"step": start, "layer": site.layer, "site": site.site, "bucket": bucket, "module": site.name}
                entries.append((m, labels))
        rows = spectrum_rows(entries)
        add_js_divergence(rows)
        return rows

    def _rows(self, window: _Window, release: bool) -> list[dict]:
        bucketed = self.freq_table is not None
        try:
            got = self._states(window, release=False)
            return [] if got is None else self._decompose(*got, bucketed)
        finally:
            if release:
                self._release(window)

    def _finish_full(self) -> None:
        window, self._full = self._full, None
        if self._worker is None:
            self._deliver(window.start, self._rows(window, release=True))
            return
        copy = "host" if self.background == "host" else "device"
        got = self._states(window, release=True, copy=copy)
        if got is not None:
            if len(self._pending) >= _MAX_PENDING:  # bound the snapshots held: wait for the oldest
                self._drain(wait=True, keep=_MAX_PENDING - 1)
            job = self._worker.submit(self._decompose, *got, self.freq_table is not None)
            self._pending.append((window.start, job))

    def _drain(self, wait: bool, keep: int = 0) -> None:
        """Deliver background results in window order: those finished (all but ``keep`` when ``wait``).

        A worker's error is raised here, at the probe call after it happened.
        """
        while len(self._pending) > keep and (wait or self._pending[0][1].done()):
            start, job = self._pending.popleft()
            self._deliver(start, job.result())

    def _deliver(self, start: int, rows: list[dict]) -> None:
        if not rows:
            return
        if self.keep:
            self._records.extend(rows)
        self._emit(start, rows, scalar_summary(rows))

    def _finish_monitor(self) -> None:
        window, self._monitor = self._monitor, None
        try:
            flat, forwards = self._gather(window, self._mon_idx, 1)
            if not forwards:
                return
            recs = [self._monitor_record(m, self.sites[i], window.start) for m, i in zip(flat, self._mon_idx) if m]
        finally:
            self._release(window)
        if self.keep:
            self.monitor_records.extend(recs)
        self._emit(window.start, None, monitor_summary(recs))

    @staticmethod
    def _monitor_record(m: Moments, site: Site, step: int) -> dict:
        rec = {
            "step": step,
            "layer": site.layer,
            "site": site.site,
            "module": site.name,
            "n_samples": m.count,
            "dim": m.dim,
            "hard_rank": math.nan,
            "trace": math.nan,
        }
        if m.count >= 2:
            cov = m.covariance()
            rec["trace"] = float(cov.trace())
            if rec["trace"] > 0:  # identical rows have no rank (as in the full records), not an error
                try:
                    rec["hard_rank"] = hard_rank_from_covariance(cov)  # tr(C)²/‖C‖²_F: no eigvalsh
                except ValueError as exc:  # NaN/Inf
                    raise SpectrumError(f"{site.label} at step {step} (monitor): {exc}") from exc
        return rec

    def _emit(self, step: int, rows: list[dict] | None, scalars: dict[str, float]) -> None:
        if distributed.rank(self.group) != 0:  # every rank holds the records; one writes them
            return
        frame = None
        for sink in self.sinks:
            if rows and type(sink).write_spectra is not Sink.write_spectra:
                if frame is None:
                    frame = to_frame(rows)
                sink.write_spectra(frame)
            if scalars:
                sink.write_scalars(step, scalars)


class _BatchScope:
    """Returned by ``Probe.batch``: as a context manager, clears the explicit batch on exit."""

    def __init__(self, probe: Probe):
        self._probe = probe

    def __enter__(self) -> Probe:
        return self._probe

    def __exit__(self, *exc) -> None:
        self._probe._explicit = None


def _ids_and_mask(args, kwargs):
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    if not torch.is_tensor(ids) or ids.is_floating_point() or ids.dtype == torch.bool:
        return None, None
    mask = kwargs.get("attention_mask")
    # Only a [batch, seq] padding mask is a row mask; 4-D attention masks are not.
    if torch.is_tensor(mask) and tuple(mask.shape) == tuple(ids.shape):
        return ids, mask != 0
    return ids, None


def attach(
    model: nn.Module,
    *,
    sites=SITE_NAMES,
    layers="auto",
    freq_table: FrequencyTable | str | Path | None = None,
    every: int = 200,
    window: int = 1,
    dtype=None,
    device=None,
    sinks: Iterable[Sink] = (),
    monitor_every: int | None = None,
    monitor_sites=("pre",),
    total_steps: int | None = None,
    start_step: int = 0,
    mode: str = "train",
    root: nn.Module | str | None = None,
    keep: bool = True,
    group=None,
    persistent_hooks: bool | None = None,
    background: bool | str = False,
) -> Probe:
    """Attach spectral telemetry to ``model``; returns a :class:`Probe` (also a context manager).

    sites: ``("pre", "post")`` (found by architecture: capscale GPT, HF GPT-2,
        Llama/Mistral/Qwen, TransformerLens) or ``{"pre": spec, "post": spec}``
        with a spec a ``"blocks.{layer}.fc1"`` pattern, modules, ``(spec, "input")``
        or a :class:`SiteSpec`.
    layers: ``"auto"`` or layer indices.
    freq_table: HEAD/MID/TAIL buckets by input token id (a FrequencyTable or its JSON file).
    every, window, total_steps, start_step: full measurements on steps with
        ``step % every == 0`` and the last step (``total_steps - 1``), each over
        ``window`` steps; ``probe.step()`` advances.
    dtype: the per-batch covariance GEMM dtype; None = the activations' own
        (bf16/fp16 widened to float32). States are always float64.
    device: where states live (default: the activations' device).
    sinks: where finished measurements go (see ``capscale.probe.sinks``).
    monitor_every, monitor_sites: the cheap level: pooled hard rank without
        eigendecomposition for ``monitor_sites`` every ``monitor_every`` steps.
    mode: capture forwards in "train" mode, "eval" mode, or "any".
    root: the module whose forward delimits one forward pass and supplies token
        ids (``input_ids`` or its first argument); default the model.
    keep: keep finished records in memory for ``compute()`` (False for long runs
        that only write to sinks).
    group: the torch.distributed process group to reduce over (default: world).
    persistent_hooks: keep hooks registered between measured steps (needed under
        torch.compile; default: only for an already compiled model).
    background: decompose finished windows off the training path: the states are
        snapshotted (True or "device": a copy on their device; "host": a host copy,
        freeing accelerator memory) and a worker thread computes the rows while
        training goes on. Rows are identical to the synchronous path; they reach
        ``compute()`` and the sinks at a later probe call (``compute``, ``flush`` and
        ``close`` wait for them), and a worker's error is raised there.
    """
    if background not in (False, True, "device", "host"):
        raise ValueError(f"background must be False, True, 'device' or 'host', got {background!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    schedule = Schedule(every, window, total_steps)
    monitor = None if monitor_every is None else Schedule(monitor_every, 1)
    if isinstance(freq_table, (str, Path)):
        freq_table = FrequencyTable.load(freq_table)
    if freq_table is not None and not isinstance(freq_table, FrequencyTable):
        raise TypeError(f"freq_table must be a FrequencyTable or a path to one, got {type(freq_table).__name__}")
    sinks = list(sinks)
    for s in sinks:
        if not all(callable(getattr(s, m, None)) for m in ("write_spectra", "write_scalars", "close")):
            raise TypeError(f"{type(s).__name__} is not a sink (needs write_spectra, write_scalars, close)")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    if isinstance(monitor_sites, str):
        monitor_sites = (monitor_sites,)
    monitor_sites = tuple(monitor_sites) if monitor is not None else ()
    if isinstance(sites, str):
        sites = (sites,)
    if isinstance(sites, dict):
        full_sites = tuple(sites)
        missing = [s for s in monitor_sites if s not in sites]
        if missing:
            raise ValueError(f"monitor_sites {missing} are not among the named sites {full_sites}")
        spec = sites
    else:
        full_sites = tuple(sites)
        spec = tuple(s for s in SITE_NAMES if s in set(full_sites) | set(monitor_sites))
        for s in (*full_sites, *monitor_sites):
            if s not in SITE_NAMES:
                raise ValueError(f"unknown site {s!r}: sites are {SITE_NAMES}")
    found = discover_sites(model, spec, layers)
    if root is None:
        root = model
    elif isinstance(root, str):
        root = model.get_submodule(root)
    if persistent_hooks is None:
        persistent_hooks = _is_compiled(model)
    return Probe(
        model,
        found,
        schedule=schedule,
        monitor=monitor,
        full_sites=full_sites,
        monitor_sites=monitor_sites,
        freq_table=freq_table,
        dtype=_as_dtype(dtype),
        device=device,
        sinks=sinks,
        mode=mode,
        root=root,
        keep=keep,
        group=group,
        persistent_hooks=persistent_hooks,
        start_step=start_step,
        background=background,
    )
