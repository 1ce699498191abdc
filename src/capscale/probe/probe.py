"""The Probe: hooks on the FFN sites, a step schedule, accumulation and hand-off to sinks.

Outside measured steps a probe costs nothing: by default its hooks are only
registered while a measurement window is open (``persistent_hooks=False``),
so an unmeasured forward runs exactly the model's own code. Under
``torch.compile`` hooks must exist before compilation and must not change
afterwards (dynamo does not guard on hook dicts), so a compiled model gets
persistent hooks that run eagerly (``torch.compiler.disable``) and return at
once when no window is open.

The Probe composes: hooks.py (installing the root and site hooks, reading a forward's
inputs), windows.py (a window's accumulators, their release and snapshots),
decomposition.py (a window's rows from its states), background.py (the worker thread)
and attaching.py (``attach``, importable from here).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from capscale.probe import decomposition, distributed, sharded, tensor_parallel
from capscale.probe.accumulate import (
    Forward,
    Moments,
    NonFiniteActivationError,
    Scratch,
    WindowMoments,
    accumulate,
    compute_dtype,
)
from capscale.probe.background import MAX_PENDING, Background
from capscale.probe.decomposition import NOT_RUN, decompose, finish_sharded, prepare_sharded, rows_site_at_a_time
from capscale.probe.estimated import spectrum_note
from capscale.probe.hooks import Hooks, ids_and_mask, routed
from capscale.probe.hoststates import (
    HostStage,
    choose_layout,
    held_bytes,
    per_device,
    state_bytes,
    transfer_for,
)
from capscale.probe.records import (
    SpectrumError,
    monitor_summary,
    scalar_summary,
    to_frame,
)
from capscale.probe.schedule import Schedule
from capscale.probe.sinks import Sink
from capscale.probe.sites import Site, Skipped, titan_ep
from capscale.probe.windows import Window as _Window
from capscale.probe.windows import accumulators, empty_moments, release, snapshot
from capscale.spectrum import BUCKETS, FrequencyTable, hard_rank_from_covariance

log = logging.getLogger("capscale")
MODES = ("train", "eval", "any")
MONITOR_COLUMNS = ("step", "stack", "layer", "site", "module", "n_samples", "dim", "hard_rank", "trace")


class NothingCapturedWarning(UserWarning):
    """A measurement window closed without a captured forward (once per probe; the message says why)."""


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
        skipped: Iterable[Skipped] = (),
        background: bool | str = False,
        states: str = "auto",
        spectrum: str = "auto",
        tp_group=None,
    ):
        self.model, self.sites, self.schedule, self.monitor = model, sites, schedule, monitor
        self.freq_table, self.dtype, self.mode, self.keep = freq_table, dtype, mode, keep
        # Resolved through a tensor: "cuda" becomes "cuda:0", as the states' own device.
        self.device = None if device is None else torch.empty(0, device=device).device
        self.sinks, self.group, self._root = list(sinks), group, root
        self.persistent_hooks = persistent_hooks
        self.skipped = list(skipped)  # blocks discovery could not measure, with the reason
        sites = self._without_ep_under_tp(sites, model, tp_group)
        self._warned_not_run: set[int] = set()
        full_sites, monitor_sites = set(full_sites), set(monitor_sites)
        self._full_idx = [i for i, s in enumerate(sites) if s.site in full_sites]
        self._mon_idx = [i for i, s in enumerate(sites) if s.site in monitor_sites] if monitor else []
        self._full_set, self._mon_set = set(self._full_idx), set(self._mon_idx)
        self._dims = {i: s.feature_dim() for i, s in enumerate(sites)}
        # Tensor-parallel sites: each rank holds its columns' rows of the states (probe/sharded.py).
        self._shards = tensor_parallel.find_shards(sites, tp_group, group, model)
        # A fused gate_up's gate is cut from each rank's own output by its shard (ColumnShard.local).
        self.sites = sites = [
            replace(s, part=None) if i in self._shards and self._shards[i].gate else s for i, s in enumerate(sites)
        ]
        self._dims.update({i: sh.full_dim for i, sh in self._shards.items()})
        # The ranks that see the same tokens (tensor parallelism), also where no site is sharded:
        # a whole site's rows count once, not once per rank of the group.
        self._tp = None if self._shards else tensor_parallel.model_group(model, tp_group)
        self.step_index = int(start_step)
        self._full: _Window | None = None
        self._monitor: _Window | None = None
        self._records: list[dict] = []  # finished spectra rows; a DataFrame only when asked for
        self.monitor_records: list[dict] = []
        self._fwd: Forward | None = None
        self._explicit: tuple | None = None
        self._hooks = Hooks()
        # Accumulators and scratch buffers are reused window after window.
        self._pool: dict[tuple[str, int], list[WindowMoments]] = {}
        # Sites run one after another and a batch's buffers are consumed before the next site
        # runs: one set (an activation batch's rows, a D×D GEMM buffer) serves them all.
        shared = Scratch()
        self._scratch = {i: shared for i in range(len(sites))}
        self._closed = False
        self._run = None  # the run-directory writer (attach(out=...)); also one of the sinks
        self._writes_elsewhere = False
        self._error: str | None = None
        self._diverged: str | None = None  # a refused non-finite forward: close() records "diverged"
        self._warned = False
        self._emitted = False
        self._closing = False
        # Off the training path: finished windows are snapshotted and decomposed by one
        # worker thread; their rows reach the records and sinks, in order, at a later call.
        self.background = background
        self._worker = Background() if background else None
        # Background + tensor parallel: the ranks of each tensor-parallel group share its whole states;
        # their workers send the rows to the writer's over a gloo group of their own.
        self._link = decomposition.worker_link(group) if background and self._shards else None
        # Where the float64 states live ("device" or "host", see capscale.probe.hoststates):
        # "auto" is decided at the first measured forward, from the free device memory.
        self.states, self.spectrum = states, spectrum
        self._layout: str | None = None
        self._layout_note = f"states: {states} (decided at the first measured forward)"
        self._stage: HostStage | None = None
        self.transfer = None  # how device scatters reach host states; None: by the device (tests may plug one)
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
        After ``close()`` it returns the kept rows not yet returned.
        """
        if self._closed:
            rows = list(self._records)
            if reset:
                self._records = []
            return to_frame(rows)
        self._drain(wait=True)
        rows = list(self._records)
        if self._full is not None:
            current = self._rows(self._full, release=reset)
            self._warn_not_run(current)
            rows += current
            if reset:
                self._full = _Window(self.step_index, self._full.end)
        if reset:
            self._records = []
        self._emitted = self._emitted or bool(rows)
        return to_frame(rows)

    @property
    def run_dir(self) -> Path | None:
        """The run directory this probe writes (``attach(out=...)``), or None."""
        return None if self._run is None else self._run.path

    def log(self, step: int | None = None, **metrics) -> None:
        """Append metrics for ``step`` (default: the current step) to the run's metrics.jsonl.

        ``loss`` (training), ``val_loss`` (and ``val_loss_head/mid/tail``) are the
        names the report reads; any other number is kept. Calls for the same step
        merge into one record. Needs ``attach(..., out=RUN_DIR)``; works after
        ``close()`` too (e.g. a final evaluation).
        """
        if self._run is None:
            if self._writes_elsewhere:  # another rank writes the run directory
                return
            raise RuntimeError("probe.log writes to a run directory: attach(model, ..., out=RUN_DIR, run_config={...})")
        self._run.log(self.step_index if step is None else step, metrics)
        if self._closed:
            self._run.flush_metrics()

    def monitor_frame(self, reset: bool = False) -> pd.DataFrame:
        """The monitoring level's records (hard rank from tr(C)²/‖C‖²_F, no eigendecomposition)."""
        df = pd.DataFrame(self.monitor_records, columns=list(MONITOR_COLUMNS))
        if reset:
            self.monitor_records = []
        return df

    @property
    def pending(self) -> int:
        """Finished windows whose rows are still being decomposed in the background (0 without)."""
        return 0 if self._worker is None else len(self._worker)

    def wait(self) -> None:
        """Hand every finished window's rows to the sinks now, waiting for background work;
        open windows stay open (e.g. before a checkpoint)."""
        self._check_open()
        self._drain(wait=True)

    def flush(self) -> None:
        """Finish the open windows now (e.g. at the end of training) and hand them to the sinks."""
        self._check_open()
        # Earlier windows' rows first: whether an empty last window deserves a warning
        # depends on whether anything was emitted before it, in the background as not.
        self._drain(wait=True)
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
        error = self._error if not flush else None
        self._closing = True
        try:
            if flush:
                self.flush()
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._remove()
            self._full = self._monitor = None
            self._closed = True
            if self._worker is not None:
                self._worker.shutdown()  # unflushed work (after an error) is dropped, as an open window is
            for sink in self.sinks:
                sink.close()
            if self._run is not None and distributed.rank(self.group) == 0:
                if self._diverged is not None:
                    self._run.finish(self.step_index, self._diverged, diverged=True)
                else:
                    self._run.finish(self.step_index, error if error is not None or flush else "closed without flush")

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an error the open window is incomplete: keep what was finished, drop it.
        if exc_type is not None:
            self._error = f"{exc_type.__name__}: {exc}"
        self.close(flush=exc_type is None)

    @property
    def description(self) -> str:
        """Which stacks, layers and sites are measured, and every block that is not, with the reason."""
        by: dict[str, list[int]] = {}
        for s in self.sites:
            if s.layer not in by.setdefault(s.stack, []):
                by[s.stack].append(s.layer)
        text = (
            "measured: "
            + "; ".join(f"{st or 'layers'} {v}" for st, v in by.items())
            + f", sites {sorted({s.site for s in self.sites})}"
        )
        text += f"\n{self._layout_note}\nspectrum: {self._spectrum_note()}"
        if self.skipped:
            text += "\nnot measured:\n" + "\n".join(f"  {s}" for s in self.skipped)
        return text

    @property
    def layout(self) -> str | None:
        """Where the float64 states live: "device" or "host" (None until the first measured forward)."""
        return self._layout

    @property
    def layout_note(self) -> str:
        """One line: where the states live and why (e.g. "states: host (auto: … > … free on cuda:0)")."""
        return self._layout_note

    def _spectrum_note(self) -> str:
        return spectrum_note(self.spectrum, [d for d in self._dims.values() if d])

    def memory(self, detail: bool = False) -> dict:
        """Bytes this probe holds per device (``{"cpu": …, "cuda:0": …}``): its states, its scratch
        buffers and host staging slots; ``detail``: per ``(device, kind)`` (see
        ``capscale.probe.hoststates.held_bytes``). A background snapshot waiting for the worker
        adds one copy of the states (with background="host", in host memory); under tensor parallelism
        the snapshots of the sharded sites are their whole states, each assembled in the host memory
        of the rank its site is dealt to (1/tp of them per rank of the writer's group)."""
        held = held_bytes([a for accs in self._pool.values() for a in accs], self._scratch.values(), self._stage)
        return held if detail else per_device(held)

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
        if self.active and not self._hooks.installed:
            self._install()
        elif not self.active and self._hooks.installed:
            self._remove()

    def _install(self) -> None:
        self._hooks.install(
            self._root, self.sites, self._on_root_pre, self._on_root_post, self._on_site, self.persistent_hooks
        )

    def _remove(self) -> None:
        self._hooks.remove()
        self._fwd = None

    def _on_root_pre(self, module, args, kwargs) -> None:
        if not self.active:
            return
        capture = self.mode == "any" or (self.mode == "train") == module.training
        if not capture:
            for w in (self._full, self._monitor):
                if w is not None:
                    w.skipped += 1
        ids, mask = ids_and_mask(args, kwargs)
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
    def _on_site(self, i: int, x, rows=None) -> None:
        fwd = self._fwd
        if fwd is None or not fwd.capture:
            if fwd is None:
                for w in (self._full, self._monitor):
                    if w is not None:
                        w.stray += 1
            return
        if rows is not None:  # MoE: the activations' rows are these token positions
            fwd = routed(fwd, rows, self.sites[i].label)
            if torch.is_tensor(x) and x.numel() == 0:
                return  # no token reached these experts on this rank (routed ran: a collective)
        full = self._full is not None and i in self._full_set
        mon = self._monitor is not None and i in self._mon_set
        if not (full or mon):
            return
        site = self.sites[i]
        if not (torch.is_tensor(x) and x.is_floating_point()):
            raise TypeError(f"{site.label}: expected a floating-point tensor, got {type(x).__name__}")
        if i in self._shards:  # a column shard: every rank sees the whole rows, keeps its block
            x = self._shards[i].gather(x)
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
        try:
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
        except NonFiniteActivationError as exc:
            self._diverged = str(exc)  # the harness's meaning: the run diverged
            raise

    def _without_ep_under_tp(self, sites: list[Site], model, tp_group) -> list[Site]:
        """Expert-parallel experts (rows sent from every rank) where the model is also tensor
        parallel are left out, with the reason: whether the ranks of a tensor-parallel group route
        the same tokens or their own part of them (sequence parallelism) is not known here, so
        neither counting their rows once nor once per rank is sure to be right."""
        ep = [s for s in sites if s.experts and titan_ep(s.module) is not None]
        if not ep or tensor_parallel.model_group(model, tp_group) is None:
            return sites
        for s in {(s.stack, s.layer, s.name): s for s in ep}.values():
            self.skipped.append(
                Skipped(
                    s.stack,
                    s.layer,
                    s.name,
                    "routed experts under expert parallelism in a tensor-parallel model: not measured "
                    "(whether the tensor-parallel ranks route the same tokens is not known here)",
                )
            )
        return [s for s in sites if s not in ep]

    def _acquire(self, level: str, i: int, d: int, k: int, device) -> list[WindowMoments]:
        if self._layout is None:
            self._choose_layout(d, device)
        shard = self._shards.get(i)
        # A tensor-parallel site keeps its row block (1/tp of the state) on the device in
        # either layout: host-held blocks are not built yet (docs/parallel.md).
        host = self._layout == "host" and shard is None
        return accumulators(self._pool, (level, i), k, d, device, host, shard, self._stage)

    def _choose_layout(self, d: int, device) -> None:
        """Decide where the states live (once), from what they need and the device's free memory."""
        k = len(BUCKETS) if self.freq_table is not None else 1
        idx = self._full_idx + self._mon_idx
        per = [k] * len(self._full_idx) + [1] * len(self._mon_idx)
        dims = [self._dims[i] or d for i in idx]
        # A tensor-parallel site holds its row block (width × D) per state, on the device in either
        # layout; a background window's snapshot of it is its assembled whole, in host memory.
        cut = [i in self._shards for i in idx]
        rows = [self._shards[i].width if c else dim for i, c, dim in zip(idx, cut, dims)]
        blocks = state_bytes(*_pick(cut, dims, per, rows))
        whole = state_bytes(*_pick([not c for c in cut], dims, per, rows))
        need = whole * (2 if self.background in (True, "device") else 1) + blocks
        self._layout, self._layout_note = choose_layout(self.states, device, need, blocks)
        log.info("capscale: %s", self._layout_note)
        if self._layout == "host":
            self._stage = HostStage(self.transfer or transfer_for(device))

    # -- finishing windows ----------------------------------------------------------
    def _gather(
        self, window: _Window, idx: list[int], per_site: int, full: bool = True, assemble: bool = True
    ) -> tuple[list[tuple[Site, Any]], int]:
        """``([(site, parts), ...], forwards)``: the window's moments (``per_site`` per site), merged
        across ranks by (stack, layer, site), and its forward count.

        Without distribution the moments share the accumulators' buffers: use
        them before ``_release``. ``full=False``: upper triangles only (for ``eigvalsh``).
        Tensor-parallel sites: see ``distributed.reduce_sites`` (``ELSEWHERE``, blocks).
        """
        entries = []
        for i in idx:
            accs = window.states.get(i)
            parts = None if accs is None else [a.moments(full=full) for a in accs]
            entries.append((self.sites[i], parts, self._dims[i], self._shards.get(i)))
        if distributed.world_size(self.group) > 1:
            return distributed.reduce_sites(entries, per_site, window.forwards, self.group, assemble, self._tp)
        out = []
        for site, parts, d, _ in entries:
            out.append((site, [None if d is None else self._empty(d)] * per_site if parts is None else parts))
        return out, window.forwards

    def _empty(self, d: int) -> Moments:
        return empty_moments(d, self.device)

    _release = staticmethod(release)

    def _states(self, window: _Window, release: bool, copy: str | None = None) -> tuple[int, list] | None:
        """The window's moments per full site, ``(start, [(site, parts), ...])``; None without forwards.

        ``copy``: None shares the accumulators' buffers (decompose before they are
        released); "device" or "host" snapshots them, so the accumulators can be released.
        """
        k = len(BUCKETS) if self.freq_table is not None else 1
        try:
            entries, forwards = self._gather(window, self._full_idx, k, full=False)
            if not forwards:
                return None
            out = []
            for site, parts in entries:
                if parts is distributed.ELSEWHERE or isinstance(parts, distributed.Foreign):
                    continue  # a sharded site: decomposed on the writing rank, or by its owner group
                if any(p is None for p in parts):  # never saw data anywhere: width unknown, a row all the same
                    out.append((site, None))
                    continue
                out.append((site, snapshot(parts, copy)))
            return window.start, out
        finally:
            if release:
                self._release(window)

    def _rows(self, window: _Window, release: bool) -> list[dict]:
        bucketed = self.freq_table is not None
        try:
            if self._shards:
                return self._rows_site_at_a_time(window, bucketed)
            got = self._states(window, release=False)
            return [] if got is None else decompose(*got, bucketed, self.spectrum)
        finally:
            if release:
                self._release(window)

    def _rows_site_at_a_time(self, window: _Window, bucketed: bool) -> list[dict]:
        k = len(BUCKETS) if bucketed else 1
        entries, forwards = self._gather(window, self._full_idx, k, full=False, assemble=False)
        if not forwards:
            return []
        return rows_site_at_a_time(entries, window.start, self.sites, self._shards, self.group, self.spectrum, bucketed)

    def _finish_full(self) -> None:
        window, self._full = self._full, None
        captured = bool(window.states)  # before the states are released
        if self._worker is None:
            rows = self._rows(window, release=True)
            # (A rank that holds only tensor-parallel blocks has no rows: the writing rank has them.)
            if not (rows or self._shards) or not captured:
                self._warn_empty(window)
            self._emitted = self._emitted or (captured and bool(self._shards))
            self._deliver(window.start, rows, captured)
            return
        # Bound the snapshots held: wait for the oldest before this window's are taken, so that
        # at most MAX_PENDING windows' snapshots exist at once.
        if len(self._worker) >= MAX_PENDING:
            self._drain(wait=True, keep=MAX_PENDING - 1)
        copy = "host" if self.background == "host" else "device"
        bucketed = self.freq_table is not None
        if self._shards:
            got = self._sharded_snapshots(window, copy)
            fn = finish_sharded
        else:
            got = self._states(window, release=True, copy=copy)
            fn = decompose
        if got is None or not captured:
            self._warn_empty(window)
        if got is not None:
            job = self._worker.submit(fn, *got, bucketed, self.spectrum, *([self._link] if self._shards else []))
            self._worker.add(window.start, job, captured)

    def _sharded_snapshots(self, window: _Window, copy: str) -> tuple[int, list] | None:
        """A window with tensor-parallel sites, for the worker (``finish_sharded``); None without forwards.

        On the training thread (collectives): the writing rank assembles the sharded sites'
        whole states one at a time, each straight into host memory, which is the worker's
        snapshot (no second copy); Lanczos / hard-only rows come from the blocks here, nothing
        assembled. Sites left whole are snapshotted as without tensor parallelism.
        """
        bucketed = self.freq_table is not None
        k = len(BUCKETS) if bucketed else 1
        try:
            entries, forwards = self._gather(window, self._full_idx, k, full=False, assemble=False)
            if not forwards:
                return None
            prepared = prepare_sharded(
                entries, window.start, self.sites, self._shards, self.group, self.spectrum, bucketed, defer=True
            )
            del entries  # the merged blocks: before the accumulators are released
            out = []
            for p in prepared:
                if p is not None and p[0] == "plain" and p[2] is not None:
                    p = ("plain", p[1], snapshot(p[2], copy))
                out.append(p)
            return window.start, out
        finally:
            self._release(window)

    def _drain(self, wait: bool, keep: int = 0) -> None:
        """Deliver background results in window order: those finished (all but ``keep`` when ``wait``).

        A worker's error is raised here, at the probe call after it happened.
        """
        if self._worker is None:
            return
        for start, rows, captured in self._worker.finished(wait, keep):
            self._deliver(start, rows, captured)

    def _deliver(self, start: int, rows: list[dict], captured: bool = True) -> None:
        if not rows:
            return
        self._emitted = True
        if captured:  # a window that captured nothing at all got the warning above, with its cause
            self._warn_not_run(rows)
        if self.keep:
            self._records.extend(rows)
        self._emit(start, rows, scalar_summary(rows))

    def _finish_monitor(self) -> None:
        window, self._monitor = self._monitor, None
        try:
            entries, forwards = self._gather(window, self._mon_idx, 1, assemble=False)
            if not forwards:
                self._warn_empty(window)
                return
            # Sharded sites: hard rank from per-block scalars summed over the tensor-parallel group.
            mine = [(site, p) for site, p in entries if not isinstance(p, distributed.Foreign)]
            blocks = [p[0] for _, p in mine if isinstance(p[0], sharded.BlockState)]
            tp = next(iter(self._shards.values())).group if blocks else None
            hard = iter(sharded.hard_ranks(blocks, tp))
            recs, owned = [], []
            for site, (m,) in mine:
                if m is not None:
                    own = next(hard) if isinstance(m, sharded.BlockState) else None
                    recs.append(self._monitor_record(m, site, window.start, own))
                    if own is not None:
                        owned.append(recs[-1])
            recs += self._foreign_records(entries, owned)
        finally:
            self._release(window)
        if self.keep:
            self.monitor_records.extend(recs)
        self._emit(window.start, None, monitor_summary(recs))

    def _foreign_records(self, entries: list, owned: list[dict]) -> list[dict]:
        """Monitor records of sharded sites another pipeline stage's tensor-parallel group computes:
        its first rank sends them to the writer in one message, which receives one per such group."""
        if distributed.world_size(self.group) == 1:
            return []
        writer, me = distributed._writer(self.group), torch.distributed.get_rank()
        tp = next(iter(self._shards.values())).group if self._shards else None
        ranks = torch.distributed.get_process_group_ranks(tp) if tp is not None else []
        holds = any(isinstance(p, list) and isinstance(p[0], sharded.BlockState) for _, p in entries)
        if holds and writer not in ranks and me == ranks[0]:  # the writer waits for it, records or none
            distributed.send_rows(owned, writer)
        if me != writer:
            return []
        leads = dict.fromkeys(p.lead for _, p in entries if isinstance(p, distributed.Foreign))
        return [r for lead in leads for r in distributed.receive_rows(lead)]

    def _warn_empty(self, window: _Window) -> None:
        """Say once why a window captured nothing, and how to fix it: a probe never records nothing silently."""
        if self._warned:
            return
        if self._closing and self._emitted and not (window.forwards or window.skipped or window.stray):
            return  # training ended as a window opened: nothing was missed
        root = type(self._root).__name__
        where = f"the measurement window at step {window.start}"
        if window.forwards:
            why = (
                f"{where} saw {window.forwards} forward(s) of the root ({root}) but none of the FFN sites ran "
                f"inside them ({', '.join(sorted({s.label for s in self.sites})[:3])}, ...): the probe is attached "
                "to a model that is not the one training, or to sites its forward does not use"
            )
        elif window.skipped:
            mode = "eval" if self.mode == "train" else "train"
            why = (
                f"{where} captured nothing: {window.skipped} forward(s) ran with the model in {mode} mode and the "
                f"probe has mode={self.mode!r}. Call model.train() before training (from_pretrained returns a "
                "model in eval mode), or attach(..., mode='any')"
            )
        elif window.stray:
            why = (
                f"{where} captured nothing: the FFN sites ran {window.stray} time(s), but never inside a forward "
                f"of the root module ({root}). Your loop calls a submodule directly: pass attach(..., root=NAME) "
                "naming the module it calls (e.g. root='model')"
            )
        else:
            why = (
                f"{where} captured nothing: the model ran no forward before the window closed at step "
                f"{self.step_index}. Call probe.step() once per optimizer step, after that step's forwards"
            )
        self._warned = True
        warnings.warn(f"capscale: {why}.", NothingCapturedWarning, stacklevel=4)

    def _warn_not_run(self, rows: list[dict]) -> None:
        """Once per site: the model ran but this site's module did not (e.g. a weight used via F.linear)."""
        idle = {(r["stack"], r["layer"], r["site"]) for r in rows if r["sampling_status"] == NOT_RUN}
        new = [i for i in self._full_idx if (s := self.sites[i]) and (s.stack, s.layer, s.site) in idle]
        new = [i for i in new if i not in self._warned_not_run]
        if new:
            self._warned_not_run.update(new)
            warnings.warn(
                "capscale: the model ran but these sites captured nothing (their modules were not called; "
                "rows say 'not-run'): " + "; ".join(self.sites[i].label for i in new),
                stacklevel=3,
            )

    @staticmethod
    def _monitor_record(m: Moments, site: Site, step: int, sharded_rank: tuple | None = None) -> dict:
        rec = {
            "step": step,
            "stack": site.stack,
            "layer": site.layer,
            "site": site.site,
            "module": site.name,
            "n_samples": m.count,
            "dim": m.dim,
            "hard_rank": math.nan,
            "trace": math.nan,
        }
        if sharded_rank is not None:  # (hard rank, trace) from the blocks: see sharded.hard_ranks
            rec["hard_rank"], rec["trace"] = sharded_rank
        elif m.count >= 2:
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


def _pick(keep: list[bool], *columns: list) -> list[list]:
    """``columns`` restricted to the positions ``keep`` marks."""
    return [[v for v, k in zip(col, keep) if k] for col in columns]


class _BatchScope:
    """Returned by ``Probe.batch``: as a context manager, clears the explicit batch on exit."""

    def __init__(self, probe: Probe):
        self._probe = probe

    def __enter__(self) -> Probe:
        return self._probe

    def __exit__(self, *exc) -> None:
        self._probe._explicit = None


# attach lives in probe/attaching.py; it is importable from here, as it always was.
from capscale.probe.attaching import attach  # noqa: E402, F401
