"""Which sites are tensor-parallel, and how to see their whole activations.

A site is a column shard of the FFN hidden state when its module's weight is a
DTensor sharded along the captured features (``ColwiseParallel``: weight
``Shard(0)``, output columns; ``RowwiseParallel``: weight ``Shard(1)``, input
columns) — the group is the weight's device-mesh dimension — or, given
``attach(..., tp_group=...)``, when its module is a plain (Megatron-style)
column- or row-parallel linear whose output or input is the rank's local shard.
Megatron's own flags are honoured: ``gather_output=True`` (a whole output) and
``input_is_parallel=False`` (a whole input) are not shards.

Each shard's ``(offset, width)`` comes from one all-gather of the local widths at
attach; columns are laid out in group-rank order, as torch's ``Shard`` and
Megatron lay them.

A fused gate_up projection (the ``pre`` site of Megatron's gated ``linear_fc1``) is a
shard too: each rank's output holds its own gate and up channels (Megatron packs them
so), and its gate channels are picked by the layout traced at discovery on that local
output, whatever the whole weight's width. The spectrum does not depend on the order of
the columns, so each rank's gate columns need only be its own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from capscale.probe.sharded import BlockMoments
from capscale.probe.sites import gate_channels, gate_layout


@dataclass(frozen=True, eq=False)
class ColumnShard:
    """A site's columns on this rank: ``[offset, offset + width)`` of ``full_dim``, over ``group``.

    ``widths``: every group rank's width, in group-rank order. ``replicas``: the group of
    ranks holding the same columns of other data (data parallel), or None.
    """

    group: object
    offset: int
    width: int
    full_dim: int
    widths: tuple[int, ...]
    replicas: object = field(default=None)
    gate: str | None = None  # a fused gate_up's layout (sites.FUSED_GATE_LAYOUTS): its gate channels are the site

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """The site's channels of a captured tensor: the gate's of a fused gate_up output, else all."""
        return x if self.gate is None else x[..., slice(*gate_channels(self.gate, int(x.shape[-1])))]

    def accumulator(self, device) -> BlockMoments:
        return BlockMoments(self.full_dim, self.offset, self.width, device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole activations ``[..., full_dim]`` from this rank's ``x`` (an all-gather over the group)."""
        if _is_dtensor(x):
            if not _shards_last(x.placements, x.ndim):
                return self.local(x.full_tensor().detach())  # replicated or sharded on tokens: make it whole
            x = x.to_local()
        x = self.local(x)
        d = int(x.shape[-1])
        if d == self.full_dim and self.width != self.full_dim:
            return x  # already whole (e.g. an output gathered by the layer itself)
        if d != self.width:
            raise ValueError(f"tensor-parallel activations have {d} columns on this rank, expected {self.width}")
        rows = x.detach().reshape(-1, d)
        wide = max(self.widths)
        if d < wide:  # all_gather needs equal sizes: pad the narrower shards
            rows = torch.nn.functional.pad(rows, (0, wide - d))
        parts = [torch.empty_like(rows) for _ in self.widths]
        torch.distributed.all_gather(parts, rows.contiguous(), group=self.group)
        whole = torch.cat([p[:, :w] for p, w in zip(parts, self.widths)], dim=1)
        return whole.reshape(*x.shape[:-1], self.full_dim)


def _is_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor, without importing DTensor's package where nothing did (seconds)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _shards_last(placements, ndim: int) -> bool:
    from torch.distributed.tensor import Shard

    return any(isinstance(p, Shard) and p.dim % ndim == ndim - 1 for p in placements)


def _as_group(tp):
    """A process group from a ProcessGroup or a 1-D DeviceMesh."""
    if tp is None or not hasattr(tp, "get_group"):
        return tp
    if tp.ndim != 1:
        raise ValueError(f"tp_group: a 1-D device mesh (e.g. mesh['tp']), got a {tp.ndim}-D one")
    return tp.get_group()


def _dtensor_layout(weight, capture: str, fsdp: bool):
    """(group, local width, full width) when ``weight`` is a DTensor sharded along the captured features.

    ``fsdp``: the weight is FSDP2's, whose own shards (dim 0 on the leading mesh dims) are whole
    again in the forward; only a last mesh dim beyond them can be tensor parallel.
    """
    if not _is_dtensor(weight):
        return None
    from torch.distributed.tensor import Shard

    dim = 0 if capture == "output" else 1  # nn.Linear: weight [out, in]
    mesh = weight.device_mesh
    for k, p in enumerate(weight.placements):
        if fsdp and (mesh.ndim == 1 or k < mesh.ndim - 1):
            continue
        if isinstance(p, Shard) and p.dim % weight.ndim == dim:
            # This mesh dimension's share only (under FSDP2 the local tensor is cut by its dims too),
            # as torch's Shard cuts: chunks of ceil(full / size).
            full, size, me = int(weight.shape[dim]), mesh.size(k), mesh.get_local_rank(k)
            chunk = -(-full // size)
            return mesh.get_group(k), max(0, min(full, (me + 1) * chunk) - min(full, me * chunk)), full
    return None


def _local_layout(module: nn.Module, capture: str, group):
    """(group, local width, None) for a Megatron-style parallel linear on ``group``, else None.

    Without ``group``, Megatron-core's layers name their own (``tp_group``).
    """
    weight = getattr(module, "weight", None)
    if group is None:
        own = getattr(module, "tp_group", None)
        group = own if isinstance(own, torch.distributed.ProcessGroup) else None
    if group is None or not torch.is_tensor(weight) or weight.dim() != 2:
        return None
    mode = _parallel_mode(module)
    if mode == "whole" or (mode, capture) in (("column", "input"), ("row", "output")):
        return None  # a layer's whole input or output (its own partial sums already reduced)
    if capture == "output" and getattr(module, "gather_output", False):
        return None
    if capture == "input" and getattr(module, "input_is_parallel", True) is False:
        return None
    return group, int(weight.shape[0] if capture == "output" else weight.shape[1]), None


# Mesh dimensions over which ranks see other tokens (data, FSDP, context, expert, pipeline):
# a parameter sharded over one of them is not tensor parallel.
_OTHER_DATA = ("dp", "fsdp", "cp", "ep", "pp", "batch")


def model_group(model: nn.Module | None, tp_group=None):
    """The model's tensor-parallel group (ranks that see the same tokens), or None.

    ``tp_group`` if given; else the ``tp_group`` of a Megatron-core / Transformer Engine layer;
    else the device-mesh dimension a DTensor parameter is sharded on, other than FSDP's own
    and dimensions named for other data (``dp*``, ``*fsdp*``, ``cp``, ``ep``, ``pp``).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or model is None:
        return None
    if tp_group is not None:
        return _as_group(tp_group)
    fsdp = _fsdp_params(model)
    for m in model.modules():
        own = getattr(m, "tp_group", None)
        if isinstance(own, dist.ProcessGroup) and dist.get_world_size(own) > 1:
            return own
        for p in m.parameters(recurse=False):
            if not _is_dtensor(p):
                continue
            mesh, names = p.device_mesh, p.device_mesh.mesh_dim_names or ()
            for k, placement in enumerate(p.placements):
                name = names[k] if k < len(names) else ""
                if id(p) in fsdp and (mesh.ndim == 1 or k < mesh.ndim - 1):
                    continue
                if any(w in name for w in _OTHER_DATA) or type(placement).__name__ not in ("Shard", "_StridedShard"):
                    continue
                if mesh.size(k) > 1:
                    return mesh.get_group(k)
    return None


def _parallel_mode(module: nn.Module) -> str | None:
    """The layer's own word on its sharding: "column", "row" or "whole"; None where it says nothing.

    Transformer Engine's layers say it in ``parallel_mode`` (None or "duplicated": whole);
    Megatron-core's in their per-partition size: ``output_size_per_partition`` (column),
    ``input_size_per_partition`` (row). Without a word, any linear is taken as a shard.
    """
    if hasattr(module, "parallel_mode"):
        mode = module.parallel_mode
        return mode if mode in ("column", "row") else "whole"
    if hasattr(module, "output_size_per_partition"):
        return "column"
    if hasattr(module, "input_size_per_partition"):
        return "row"
    return None


def _fsdp_params(model: nn.Module | None) -> set[int]:
    """Ids of the parameters FSDP2 (``fully_shard``) manages in ``model``."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP2 module exists (saves seconds)
    if model is None or fsdp is None or not hasattr(fsdp, "FSDPModule"):
        return set()
    FSDPModule = fsdp.FSDPModule  # noqa: N806
    return {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}


def find_shards(sites, tp_group=None, group=None, model: nn.Module | None = None) -> dict[int, ColumnShard]:
    """The tensor-parallel sites among ``sites`` (index → :class:`ColumnShard`); a collective at attach.

    ``tp_group``: the tensor-parallel group (a ProcessGroup or 1-D DeviceMesh) of Megatron-style
    layers; DTensor weights name their own. ``group``: the run's ranks (default: world), over
    which the replicas (same columns, other data) are found. ``model``: to tell FSDP2's
    parameter shards from tensor-parallel ones.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    tp_group = _as_group(tp_group)
    found = {}
    fsdp = _fsdp_params(model)
    for i, s in enumerate(sites):
        w = getattr(s.module, "weight", None)
        layout = _dtensor_layout(w, s.capture, id(w) in fsdp) or _local_layout(s.module, s.capture, tp_group)
        if layout is None or dist.get_world_size(layout[0]) == 1:  # a group of one rank shards nothing
            continue
        if s.experts or s.members:
            raise NotImplementedError(
                f"{s.label}: experts split by tensor parallelism are not supported "
                "(experts placed whole on ranks, expert parallelism, are)"
            )
        found[i] = layout
    groups = {id(g): g for g, _, _ in found.values()}
    if not found:
        return {}
    if len(groups) > 1:
        raise NotImplementedError("sites on more than one tensor-parallel group")
    (tp,) = groups.values()
    size = dist.get_world_size(tp)
    local = torch.tensor([w for _, w, _ in found.values()], dtype=torch.int64)
    every = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(every, local, group=tp)
    every = torch.stack(every)  # [tp rank, site]
    me = dist.get_rank(tp)
    replicas = _replica_group(tp, group, sorted((sites[i].stack, sites[i].layer, sites[i].site) for i in found))
    out = {}
    for j, (i, (_, width, full)) in enumerate(found.items()):
        widths = tuple(int(v) for v in every[:, j].tolist())
        total = sum(widths)
        if full is not None and full != total:
            raise ValueError(f"{sites[i].label}: local widths {widths} do not add up to the weight's {full}")
        gate = None
        if sites[i].part is not None:  # the gate of a fused gate_up: half of each rank's channels
            gate = gate_layout(sites[i].part)
            if any(w % 2 for w in widths):  # every rank sees every width: all refuse alike
                raise ValueError(
                    f"{sites[i].label}: a tensor-parallel fused gate_up is split {widths} over the ranks; "
                    "each rank must hold whole gate and up halves (Megatron packs them so)"
                )
            widths, width, total = tuple(w // 2 for w in widths), width // 2, total // 2
        out[i] = ColumnShard(tp, sum(widths[:me]), width, total, widths, replicas, gate)
    return out


def _replica_group(tp, group, keys: list):
    """The ranks of ``group`` with this rank's tensor-parallel rank and sharded sites ``keys``
    (its data-parallel peers: the same columns of the same layers, other data), or None.

    Pipeline stages hold other layers: a rank of another stage with the same tensor-parallel
    rank is no replica. Every rank of the world creates every such group (``new_group`` is
    collective), in one order.
    """
    dist = torch.distributed
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    mine = repr((dist.get_rank(tp), keys))
    every: list = [None] * len(ranks)
    dist.all_gather_object(every, mine, group=group)
    by: dict[str, list[int]] = {}
    for r, k in zip(ranks, every):
        by.setdefault(k, []).append(r)
    if all(len(v) == 1 for v in by.values()):
        return None
    out = None
    for k in sorted(by):
        g = dist.new_group(by[k])
        if mine == k:
            out = g
    return out if len(by[mine]) > 1 else None
