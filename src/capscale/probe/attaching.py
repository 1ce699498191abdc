"""``attach``: checks its arguments, finds the sites and makes a :class:`Probe`.

(Named ``attaching`` rather than ``attach``: ``capscale.probe.attach`` is the function, and
a submodule of that name would shadow it on the package.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from capscale.probe import distributed
from capscale.probe.config import ATTACH_DEFAULTS, TELEMETRY_FIELDS, TelemetryConfig
from capscale.probe.estimated import SPECTRUM_METHODS
from capscale.probe.hooks import is_compiled
from capscale.probe.hoststates import STATE_LAYOUTS
from capscale.probe.probe import MODES, Probe
from capscale.probe.schedule import Schedule
from capscale.probe.sinks import Sink
from capscale.probe.sites import SITE_NAMES, discover
from capscale.spectrum import FrequencyTable


def attach(
    model: nn.Module,
    config: TelemetryConfig | None = None,
    *,
    layers="auto",
    freq_table: FrequencyTable | str | Path | None = None,
    device=None,
    sinks: Iterable[Sink] = (),
    monitor_sites=("pre",),
    total_steps: int | None = None,
    start_step: int = 0,
    mode: str = "train",
    root: nn.Module | str | None = None,
    keep: bool = True,
    group=None,
    persistent_hooks: bool | None = None,
    out: str | Path | None = None,
    run_config: dict | None = None,
    tp_group=None,
    **overrides,
) -> Probe:
    """Attach spectral telemetry to ``model``; returns a :class:`Probe` (also a context manager).

    config: a :class:`~capscale.probe.config.TelemetryConfig` (what the harness's
        ``[telemetry]`` table builds): every, window, sites, buckets, monitor_every,
        dtype, background, states, spectrum. Each of these may also be given as a
        keyword, which overrides the config's value (and may be what only a keyword can
        hold: a ``sites`` mapping, a torch dtype). Without a config, attach's defaults
        are the table's but ``every=200``. ``buckets=False`` ignores ``freq_table``.

    sites: ``("pre", "post")`` (found by structure in any transformer, see
        docs/models.md; blocks that cannot be measured are warned about and listed in
        ``probe.description``) or ``{"pre": spec, "post": spec}``
        with a spec a ``"blocks.{layer}.fc1"`` pattern, modules, ``(spec, "input")``
        or a :class:`SiteSpec`.
    layers: ``"auto"`` or layer indices.
    freq_table: HEAD/MID/TAIL buckets by input token id (a FrequencyTable or its JSON file).
    every, window, total_steps, start_step: full measurements on steps with
        ``step % every == 0`` and a final window ending at ``total_steps``, each over
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
    out, run_config: write a run directory as the run goes (docs/run-format.md), which
        ``capscale report`` analyses: config.json from ``run_config`` (``optimizer``
        or ``label`` names the series; ``seed``, ``ffn_width``, ``variant``, ``steps``),
        spectra after every window, ``probe.log(step, loss=..., val_loss=...)``
        metrics, status "done" on ``close()``.
    background: decompose finished windows off the training path: the states are
        snapshotted (True or "device": a copy on their device; "host": a host copy,
        freeing accelerator memory) and a worker thread computes the rows while
        training goes on. Rows are identical to the synchronous path; they reach
        ``compute()`` and the sinks at a later probe call (``compute``, ``flush`` and
        ``close`` wait for them), and a worker's error is raised there.
    states: where the float64 states live: "device" (the activations' device), "host"
        (host memory; the device keeps one D×D buffer in the GEMM dtype, whose scatter
        is copied over after each batch: bounded device memory, same numbers), or
        "auto" (default): "device" while the states take at most a quarter of the free
        device memory, else "host"; on a CPU the states are host memory either way.
        ``probe.description`` says which was chosen, ``probe.memory()`` the bytes held.
    spectrum: how ranks are computed: "exact" (eigvalsh), "lanczos" (stochastic
        Lanczos quadrature: soft rank with its standard error, no eigenvalues),
        "hard-only" (tr(C)²/‖C‖²_F), or "auto" (default): exact where a state's
        decomposition fits in half the free host memory, else Lanczos.
    tp_group: the tensor-parallel group (a ProcessGroup or a 1-D DeviceMesh) of
        Megatron-style column/row-parallel linears whose outputs/inputs are local
        shards; DTensor weights (``ColwiseParallel``/``RowwiseParallel``) name their
        own. Each rank keeps its columns' rows of the states; rows equal the
        unsharded model's and are decomposed on the writing rank (docs/parallel.md).
    """
    every, window, sites, monitor_every, dtype, background, states, spectrum, buckets = _settings(config, overrides)
    if not buckets:
        freq_table = None
    if states not in STATE_LAYOUTS:
        raise ValueError(f"states must be one of {STATE_LAYOUTS}, got {states!r}")
    if spectrum not in SPECTRUM_METHODS:
        raise ValueError(f"spectrum must be one of {SPECTRUM_METHODS}, got {spectrum!r}")
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
    if not isinstance(layers, str):  # records name layers 0..N-1: a negative index names none of them
        bad = [x for x in ([layers] if isinstance(layers, int) else layers) if isinstance(x, int) and x < 0]
        if bad:
            raise ValueError(f"layers must be layer indices >= 0 (as the records name them), got {bad}")
    found = discover(model, spec, layers)
    if found.skipped:
        warnings.warn(
            f"capscale.attach: {len(found.skipped)} block(s) of {type(model).__name__} are not measured: "
            + "; ".join(str(s) for s in found.skipped),
            stacklevel=2,
        )
    if root is None:
        root = model
    elif isinstance(root, str):
        root = model.get_submodule(root)
    if persistent_hooks is None:
        persistent_hooks = is_compiled(model)
    from capscale.probe.runwriter import RunWriter, check_run_config

    check_run_config(out, run_config)  # on every rank, not only the one that writes
    run = None
    if out is not None and distributed.rank(group) == 0:  # every check above passed: now write
        run = RunWriter(out, run_config, start_step=start_step, total_steps=total_steps)
        sinks.append(run)
    probe = Probe(
        model,
        found.sites,
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
        skipped=found.skipped,
        background=background,
        states=states,
        spectrum=spectrum,
        tp_group=tp_group,
    )
    probe._run, probe._writes_elsewhere = run, out is not None
    return probe


def _settings(config: TelemetryConfig | None, overrides: dict) -> tuple:
    """The config's fields with the keyword overrides applied (unknown keywords refused)."""
    unknown = sorted(set(overrides) - set(TELEMETRY_FIELDS))
    if unknown:
        raise TypeError(f"attach() got unknown keyword(s) {unknown}; telemetry settings are {list(TELEMETRY_FIELDS)}")
    if config is None:
        config = TelemetryConfig(**ATTACH_DEFAULTS)
    elif not isinstance(config, TelemetryConfig):
        raise TypeError(f"attach() config must be a TelemetryConfig, got {type(config).__name__}")
    value = {f: overrides.get(f, getattr(config, f)) for f in TELEMETRY_FIELDS}
    if value["enabled"] is not True:
        raise ValueError("attach() got a telemetry config with enabled=false: there is nothing to attach")
    names = ("every", "window", "sites", "monitor_every", "dtype", "background", "states", "spectrum", "buckets")
    return tuple(value[n] for n in names)


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
