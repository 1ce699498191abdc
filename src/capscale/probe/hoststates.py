"""Bounded device memory: float64 states held in host memory, fed by the device's batch scatters.

In the "device" layout every site × bucket keeps a float64 D×D state on the
activations' device: 72 states of 3,072² (5.4 GB; 7.2 GB with the merged "all" matrices)
at the paper-160m shape. In the
"host" layout the device keeps only one reused D×D buffer in the GEMM dtype (and the
activation rows it centres): each batch's scatter is formed there, copied without
blocking into a pinned host buffer, and added to the float64 host state once the copy
is known to be done. Two staging slots let the host add of one batch overlap the
device's next GEMM and copy.

Ordering. The device buffer is overwritten by the next GEMM only after the copy that
reads it (both are queued on the same stream). A staging slot is read on the host only
after its copy's event has completed (:meth:`Transfer.wait`), and reused only after
that. Everything that reads a state (``moments``, ``mean``, ``copy``, ``reset``, ``load``)
first drains the stage, so results are those of the device layout: the same GEMMs, the
same float64 additions (up to their order).

The copy mechanism is pluggable (:class:`Transfer`): CUDA uses events; on a CPU the
"device" buffer and the host state are both host tensors and the copy is immediate,
but the path is the same one (tests drive it with a deliberately late transfer).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from capscale.spectrum._torch import WindowMoments

STATE_LAYOUTS = ("auto", "device", "host")
# "auto" keeps the states on the device while they (and a background snapshot) take at
# most this fraction of its free memory; beyond it, in host memory.
AUTO_DEVICE_FRACTION = 0.25
SLOTS = 2  # staging slots: one being filled by the device while the host adds the other
BAND = 256  # rows per band of a host add over the upper triangle (the diagonal blocks' lower halves ride along)


class Transfer:
    """Device → host copies: ``start`` queues one (non-blocking where the device allows), ``wait``
    returns once it has landed. The base class copies synchronously (a CPU "device")."""

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def start(self, dst: torch.Tensor, src: torch.Tensor):
        dst.copy_(src)
        return None

    def wait(self, token) -> None:
        return None


class CudaTransfer(Transfer):
    """Pinned staging buffers, ``copy_(non_blocking=True)`` on the current stream and an event per copy."""

    def host_buffer(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def start(self, dst, src):
        dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, token) -> None:
        token.synchronize()


def transfer_for(device: torch.device) -> Transfer:
    return CudaTransfer() if torch.device(device).type == "cuda" else Transfer()


class HostStage:
    """The staging slots shared by a probe's host states, and the copies in flight (in order)."""

    def __init__(self, transfer: Transfer, slots: int = SLOTS):
        self.transfer = transfer
        self.slots = max(1, int(slots))
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._made: dict[tuple, int] = {}
        self._pending: deque = deque()  # (tokens, acc, count, mean slot, scatter slot or None)

    def _slot(self, shape, dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        free = self._free.setdefault(key, [])
        while not free:
            if self._made.get(key, 0) < self.slots:
                self._made[key] = self._made.get(key, 0) + 1
                return self.transfer.host_buffer(tuple(shape), dtype)
            self._complete_one()  # the oldest copy lands and frees its slots
        return free.pop()

    def submit(self, acc: HostMoments, count: int, mean: torch.Tensor, scatter: torch.Tensor | None) -> None:
        """Queue a batch's mean and scatter (device tensors) for ``acc``; the previous batch's add runs now."""
        mean_slot = self._slot(mean.shape, mean.dtype)
        scatter_slot = None if scatter is None else self._slot(scatter.shape, scatter.dtype)
        tokens = [self.transfer.start(mean_slot, mean)]
        if scatter_slot is not None:
            tokens.append(self.transfer.start(scatter_slot, scatter))
        self._pending.append((tokens, acc, count, mean_slot, scatter_slot))
        while len(self._pending) > self.slots - 1:
            self._complete_one()

    def _complete_one(self) -> None:
        tokens, acc, count, mean_slot, scatter_slot = self._pending.popleft()
        for token in tokens:
            self.transfer.wait(token)
        WindowMoments.add(acc, count, mean_slot.clone(), scatter_slot)
        self._free[(tuple(mean_slot.shape), mean_slot.dtype)].append(mean_slot)
        if scatter_slot is not None:
            self._free[(tuple(scatter_slot.shape), scatter_slot.dtype)].append(scatter_slot)

    def drain(self) -> None:
        """Every queued batch added to its state."""
        while self._pending:
            self._complete_one()

    def nbytes(self) -> int:
        """Host bytes of the staging slots."""
        n = 0
        for (shape, dtype), made in self._made.items():
            numel = 1
            for s in shape:
                numel *= s
            n += made * numel * torch.empty(0, dtype=dtype).element_size()
        return n


class HostMoments(WindowMoments):
    """A float64 state in host memory, fed through a :class:`HostStage` with the scatter in its GEMM dtype."""

    staged = True  # accumulate() hands over the GEMM-dtype scatter, not a widened device copy

    def __init__(self, dim: int, stage: HostStage, dtype: torch.dtype = torch.float64):
        super().__init__(dim, "cpu", dtype)
        self.stage = stage

    def takes_rows(self, dtype: torch.dtype) -> bool:
        return False  # the GEMM runs on the device, into the shared buffer

    def _write(self, scatter: torch.Tensor) -> None:
        """Add a staged scatter (GEMM dtype, host) into the float64 state in one pass over its upper
        triangle (row bands × the columns from the band on: only the upper triangle of a state is
        read, ``capscale.spectrum._torch``), about half the entries. NumPy's mixed-dtype add is ~3x
        torch's ``add_`` with a dtype promotion at D = 3,072 on one core, and a widening copy
        first would cost a second pass."""
        if scatter.dtype == self.scatter.dtype or scatter.device.type != "cpu":
            return super()._write(scatter)
        dst, src = self.scatter.numpy(), scatter.numpy()
        op = np.copyto if self._stale else (lambda d, s: np.add(d, s, out=d))
        for a in range(0, self.dim, BAND):
            op(dst[a : a + BAND, a:], src[a : a + BAND, a:])
        self._stale = False

    def add(self, count: int, mean: torch.Tensor, scatter: torch.Tensor | None) -> None:
        if count == 0:
            return
        self.stage.submit(self, int(count), mean.detach(), None if scatter is None else scatter.detach())

    def reset(self) -> None:
        self.stage.drain()
        super().reset()

    def mean(self) -> torch.Tensor:
        self.stage.drain()
        return super().mean()

    def moments(self, full: bool = True):
        self.stage.drain()
        return super().moments(full)

    def load(self, count, mean, scatter) -> None:
        self.stage.drain()
        super().load(count, mean, scatter)

    def copy(self) -> WindowMoments:
        self.stage.drain()
        return super().copy()


def state_bytes(dims: list[int], per_site: list[int], rows: list[int] | None = None, itemsize: int = 8) -> int:
    """Bytes of the states: ``per_site[j]`` states of ``rows[j] × dims[j]`` for each site ``j``
    (``rows`` None: ``dims``, whole D×D states; a tensor-parallel site holds its block's width)."""
    rows = dims if rows is None else rows
    return sum(k * r * d * itemsize for d, k, r in zip(dims, per_site, rows))


def choose_layout(requested: str, device: torch.device, need_bytes: int, block_bytes: int = 0) -> tuple[str, str]:
    """The state layout for ``requested`` ("auto", "device" or "host") and a line saying why.

    ``need_bytes``: the states' bytes in the device layout, of which ``block_bytes`` are
    tensor-parallel row blocks, which stay on the device in either layout.
    """
    device = torch.device(device)
    gb = need_bytes / 1e9
    blocks = (
        f"; of which tensor-parallel row blocks {block_bytes / 1e9:.3g} GB, on the device in either layout"
        if block_bytes
        else ""
    )
    if requested != "auto":
        return requested, f"states: {requested} (as requested; float64 states {gb:.3g} GB{blocks})"
    if device.type != "cuda":
        return "device", f"states: device ({device.type}: the float64 states, {gb:.3g} GB, are in host memory{blocks})"
    free, _ = torch.cuda.mem_get_info(device)
    if need_bytes <= AUTO_DEVICE_FRACTION * free:
        return "device", (
            f"states: device (auto: float64 states {gb:.3g} GB ≤ {AUTO_DEVICE_FRACTION:g} of "
            f"{free / 1e9:.3g} GB free on {device}{blocks})"
        )
    return "host", (
        f"states: host (auto: float64 states {gb:.3g} GB > {AUTO_DEVICE_FRACTION:g} of {free / 1e9:.3g} GB free on "
        f"{device}; the device keeps one D×D GEMM buffer{blocks})"
    )


def _bytes(t: torch.Tensor | None) -> tuple[str, int]:
    return ("", 0) if t is None else (str(t.device), t.numel() * t.element_size())


def held_bytes(accumulators, scratches, stage: HostStage | None) -> dict[tuple[str, str], int]:
    """Bytes held per ``(device, kind)``: "states" (the accumulators' D×D states, float32 partial
    sums and batch means), "rows" (the activation rows in the GEMM dtype: one batch), "gemm"
    (D×D GEMM buffers), "staging" (host slots of the copies in flight, host layout)."""
    out: dict[tuple[str, str], int] = {}

    def count(dev: str, kind: str, n: int) -> None:
        if n:
            out[(dev, kind)] = out.get((dev, kind), 0) + n

    for a in accumulators:
        # a tensor-parallel row block (probe.sharded.BlockMoments) has one mean and no partial sums
        parts = (getattr(a, "_partial", None), *getattr(a, "_means", (getattr(a, "_mean", None),)))
        for t in (a.scatter, *parts):
            dev, n = _bytes(t)
            count(dev, "states", n)
    for sc in {id(s): s for s in scratches}.values():  # shared scratch counted once
        for (name, _, _), buf in sc._bufs.items():
            dev, n = _bytes(buf)
            count(dev, "rows" if name == "rows" else "gemm", n)
    if stage is not None:
        count("cpu", "staging", stage.nbytes())
    return out


def per_device(held: dict[tuple[str, str], int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for (dev, _), n in held.items():
        total[dev] = total.get(dev, 0) + n
    return total
