"""Measurement windows and their states: the accumulators a window fills (reused window
after window), their release, and snapshots of their moments for the background worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from capscale.probe.accumulate import Moments, WindowMoments
from capscale.probe.hoststates import HostMoments, HostStage


@dataclass
class Window:
    """One open measurement: states per site index, and how many forwards it captured."""

    start: int
    end: int
    states: dict[int, Any] = field(default_factory=dict)
    forwards: int = 0
    skipped: int = 0  # root forwards in the other train/eval mode: not captured
    stray: int = 0  # site activations outside any root forward


def accumulators(
    pool: dict, key: tuple[str, int], k: int, d: int, device, host: bool, shard, stage: HostStage | None
) -> list:
    """``k`` accumulators for one site (``key``: level and site index), from ``pool`` while they
    fit (count, device, layout), else new ones: a tensor-parallel ``shard``'s row blocks, host
    states (``host``, staged through ``stage``) or device states."""
    accs = pool.get(key)
    want = torch.device("cpu") if host else torch.device(device)
    if accs is None or len(accs) != k or accs[0].scatter.device != want or isinstance(accs[0], HostMoments) != host:
        if shard is not None:
            accs = [shard.accumulator(device) for _ in range(k)]
        elif host:
            accs = [HostMoments(d, stage) for _ in range(k)]
        else:
            accs = [WindowMoments(d, device) for _ in range(k)]
        pool[key] = accs
    return accs


def release(window: Window) -> None:
    """Empty the window's accumulators for reuse by the next window."""
    for accs in window.states.values():
        for a in accs:
            a.reset()
    window.states.clear()


def empty_moments(d: int, device) -> Moments:
    """The state of a site or bucket that saw no rows in a window."""
    dev = device or torch.device("cpu")
    return Moments(
        0,
        torch.zeros(d, dtype=torch.float64, device=dev),
        torch.zeros(d, d, dtype=torch.float64, device=dev),
    )


def snapshot(parts: list[Moments], copy: str | None) -> list[Moments]:
    """``parts`` as they are (``copy`` None: the accumulators' own buffers), or copied to
    the host ("host") or on their device ("device"), so the accumulators can be released."""
    if copy == "host":
        return [replace(p, mean=p.mean.to("cpu", copy=True), scatter=p.scatter.to("cpu", copy=True)) for p in parts]
    if copy == "device":
        return [replace(p, mean=p.mean.clone(), scatter=p.scatter.clone()) for p in parts]
    return parts
