"""Tensor / data×tensor / pipeline / expert parallelism on gloo: every row equals the unsharded model's.

One spawn per world size runs every scenario (torch's start-up dominates a toy run); rank 0
saves the probe's rows and an independent float64 reference computed from an unsharded
twin with the same weights (its own hooks, NumPy covariances and eigenvalues), and each
test compares one scenario's rows with it.
"""

from __future__ import annotations

import copy
import datetime
import pickle
import re
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as fn
from gloo_results import result
from test_probe_distributed import table
from torch import nn

import capscale

V, H, F, S = 50, 8, 18, 6  # F = 18: uneven column shards over 4 ranks (5, 5, 5, 3)
STEPS, LAYERS = 2, 2
BUCKET_OF = {**dict.fromkeys((0, 1), "head"), **dict.fromkeys(range(2, 6), "mid")}  # the rest: tail
PATTERNS = {"pre": "layers.{layer}.mlp.up", "post": ("layers.{layer}.mlp.down", "input")}
GATED = {"pre": "layers.{layer}.mlp.w1", "post": ("layers.{layer}.mlp.w2", "input")}


# The gate's channels of a fused gate_up output, by layout: Megatron's first half, or every other one.
FUSED = {"first": slice(0, F), "interleaved": slice(0, 2 * F, 2)}


class MLP(nn.Module):
    def __init__(self, gated: bool = False, fused: str | None = None):
        super().__init__()
        self.gated, self.fused = gated, fused
        if gated:  # torchtitan's feed_forward: w2(silu(w1 x) * w3 x)
            self.w1, self.w3, self.w2 = (
                nn.Linear(H, F, bias=False),
                nn.Linear(H, F, bias=False),
                nn.Linear(F, H, bias=False),
            )
        elif fused:  # one projection to gate and up (Megatron's gated linear_fc1)
            self.gate_up, self.down = nn.Linear(H, 2 * F), nn.Linear(F, H)
        else:
            self.up, self.down = nn.Linear(H, F), nn.Linear(F, H)

    def forward(self, x):
        if self.gated:
            return self.w2(fn.silu(self.w1(x)) * self.w3(x))
        if self.fused == "first":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(fn.silu(gate) * up)
        if self.fused == "interleaved":
            gu = self.gate_up(x)
            return self.down(fn.silu(gu[..., ::2]) * gu[..., 1::2])
        return self.down(torch.tanh(self.up(x)))


class Mixer(nn.Module):
    """Attention's shapes (a packed q, k, v projection H -> 3H and an output projection H -> H),
    mixing within columns only, so that splitting the columns over ranks computes the same."""

    def __init__(self):
        super().__init__()
        self.linear_qkv, self.linear_proj = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x):
        q, k, v = self.linear_qkv(x).chunk(3, dim=-1)
        return self.linear_proj(v * torch.sigmoid(q * k))


class Block(nn.Module):
    def __init__(self, gated: bool = False, fused: str | None = None):
        super().__init__()
        self.self_attention = Mixer() if fused == "first" else None  # Megatron's layer: attention, then MLP
        self.mlp = MLP(gated, fused)

    def forward(self, x):
        if self.self_attention is not None:
            x = x + self.self_attention(x)
        return x + self.mlp(x)


class Net(nn.Module):
    """Blocks in an nn.ModuleDict keyed by the global layer index (a pipeline stage deletes keys)."""

    def __init__(self, layers: int = LAYERS, gated: bool = False, seed: int = 0, fused: str | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.pos = nn.Embedding(V, H), nn.Parameter(torch.randn(S, H))
        self.layers = nn.ModuleDict({str(i): Block(gated, fused) for i in range(layers)})
        self.double()

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x) + self.pos
        for block in self.layers.values():
            x = block(x)
        return x


def _chunk(n: int, size: int, rank: int) -> tuple[int, int]:
    c = -(-n // size)  # torch's Shard / torch.chunk layout
    return min(rank * c, n), min((rank + 1) * c, n)


class ColumnParallel(nn.Module):
    """Megatron-style: this rank's output columns of a linear (a local tensor, not a DTensor)."""

    def __init__(self, full: nn.Linear, rank: int, size: int):
        super().__init__()
        a, b = _chunk(full.out_features, size, rank)
        self.weight = nn.Parameter(full.weight[a:b].detach().clone())
        self.bias = nn.Parameter(full.bias[a:b].detach().clone())

    def forward(self, x):
        return fn.linear(x, self.weight, self.bias)


class MegatronColumn(nn.Module):
    """Megatron-core's ColumnParallelLinear as capscale reads it: its size attributes, its own
    ``tp_group``, this rank's ``[rows, in]`` weight, ``(output, bias)`` returned."""

    gather_output = False

    def __init__(self, full: nn.Linear, rows: torch.Tensor, group):
        super().__init__()
        self.input_size, self.output_size, self.output_size_per_partition = (
            full.in_features,
            full.out_features,
            len(rows),
        )
        self.tp_group = group
        self.weight = nn.Parameter(full.weight[rows].detach().clone())
        self.bias = nn.Parameter(full.bias[rows].detach().clone())

    def forward(self, x):
        return fn.linear(x, self.weight, self.bias), None


class MegatronRow(nn.Module):
    """Megatron-core's RowParallelLinear: this rank's input columns; partial outputs summed over ``tp_group``."""

    input_is_parallel = True

    def __init__(self, full: nn.Linear, rank: int, size: int, group):
        super().__init__()
        a, b = _chunk(full.in_features, size, rank)
        self.input_size, self.output_size, self.input_size_per_partition = full.in_features, full.out_features, b - a
        self.tp_group = group
        self.weight = nn.Parameter(full.weight[:, a:b].detach().clone())
        self.bias = nn.Parameter(full.bias.detach().clone())

    def forward(self, x):
        y = fn.linear(x, self.weight)
        dist.all_reduce(y, group=self.tp_group)
        return y + self.bias, None


class MegatronMixer(nn.Module):
    """The mixer on one rank: its q, k and v columns (Megatron packs them per rank), its part of the output projection."""

    def __init__(self, whole: Mixer, rank: int, size: int, group):
        super().__init__()
        a, b = _chunk(H, size, rank)
        rows = torch.cat([torch.arange(a, b) + k * H for k in range(3)])
        self.linear_qkv = MegatronColumn(whole.linear_qkv, rows, group)
        self.linear_proj = MegatronRow(whole.linear_proj, rank, size, group)

    def forward(self, x):
        qkv, _ = self.linear_qkv(x)
        q, k, v = qkv.chunk(3, dim=-1)
        out, _ = self.linear_proj(v * torch.sigmoid(q * k))
        return out


class MegatronGatedMLP(nn.Module):
    """Megatron-core's MLP with ``gated_linear_unit``: ``linear_fc1`` holds this rank's gate rows, then
    its up rows; ``glu`` chunks its output in two."""

    def __init__(self, whole: MLP, rank: int, size: int, group):
        super().__init__()
        a, b = _chunk(F, size, rank)
        rows = torch.cat([torch.arange(a, b), torch.arange(F + a, F + b)])
        self.linear_fc1 = MegatronColumn(whole.gate_up, rows, group)
        self.linear_fc2 = MegatronRow(whole.down, rank, size, group)

    def forward(self, x):
        h, _ = self.linear_fc1(x)
        gate, up = h.chunk(2, dim=-1)
        out, _ = self.linear_fc2(fn.silu(gate) * up)
        return out


class RowParallel(nn.Module):
    """Megatron-style: takes this rank's input columns; the partial outputs are summed over the group."""

    input_is_parallel = True

    def __init__(self, full: nn.Linear, rank: int, size: int, group):
        super().__init__()
        a, b = _chunk(full.in_features, size, rank)
        self.weight = nn.Parameter(full.weight[:, a:b].detach().clone())
        self.bias = nn.Parameter(full.bias.detach().clone())
        self.group = group

    def forward(self, x):
        y = fn.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y + self.bias


def batches(replica: int, seed: int = 5) -> list[list[torch.Tensor]]:
    """Per step, two id batches of data-parallel replica ``replica`` (every bucket present)."""
    g = torch.Generator().manual_seed(seed + 100 * replica)
    out = []
    for _ in range(STEPS):
        # a third of the tokens from each bucket's ids: HEAD {0, 1}, MID {2..5}, TAIL the rest
        b = torch.randint(0, 3, (2, 2, S), generator=g)
        lo, hi = torch.tensor([0, 2, 6])[b], torch.tensor([2, 6, V])[b]
        out.append([lo[k] + (torch.rand(2, S, generator=g) * (hi[k] - lo[k])).long() for k in range(2)])
    return out


def run(probe, model, steps, stage_ids=None):
    with torch.no_grad():
        for step in steps:
            for ids in step:
                if stage_ids is None:
                    model(ids)
                else:
                    stage_ids(probe, model, ids)
            probe.step()
    df = probe.compute()
    mon = probe.monitor_frame()
    probe.close()
    return df, mon


def reference(twin: Net, steps_by_replica: list, sites: dict) -> dict:
    """Eigenvalues per (layer, site, bucket) over every replica's data, and per-step pooled hard ranks."""
    got: dict = {}
    hooks = []
    for name, block in twin.layers.items():
        for site, spec in sites.items():
            path, capture, *cut = (spec, "output") if isinstance(spec, str) else spec
            mod = block.get_submodule(path.split("{layer}.")[1])
            cut = cut[0] if cut else slice(None)  # the gate's channels of a fused gate_up
            if capture == "output":
                hooks.append(
                    mod.register_forward_hook(lambda m, a, o, k=(int(name), site), c=cut: got[k].append(o[..., c]))
                )
            else:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, k=(int(name), site): got[k].append(a[0])))
    rows: dict = {}
    per_step: dict = {}
    with torch.no_grad():
        for replica in steps_by_replica:
            for t, step in enumerate(replica):
                for ids in step:
                    got.clear()
                    for k in [(int(n), s) for n in twin.layers for s in sites]:
                        got[k] = []
                    twin(ids)
                    for k, (x,) in got.items():
                        rows.setdefault(k, []).append((ids.reshape(-1), x.reshape(-1, x.shape[-1])))
                        per_step.setdefault((t, *k), []).append(x.reshape(-1, x.shape[-1]))
    for h in hooks:
        h.remove()
    return summarise(rows, per_step)


def summarise(rows: dict, per_step: dict) -> dict:
    out = {}
    for (layer, site), chunks in rows.items():
        ids = torch.cat([i for i, _ in chunks]).numpy()
        x = torch.cat([r for _, r in chunks]).numpy()
        buckets = np.array([BUCKET_OF.get(int(i), "tail") for i in ids])
        for b in ("all", "head", "mid", "tail"):
            sel = x if b == "all" else x[buckets == b]
            out[(layer, site, b)] = (len(sel), np.sort(np.linalg.eigvalsh(np.cov(sel, rowvar=False)))[::-1])
    for (t, layer, site), xs in per_step.items():
        lam = np.linalg.eigvalsh(np.cov(torch.cat(xs).numpy(), rowvar=False))
        out[("monitor", t, layer, site)] = lam.sum() ** 2 / (lam**2).sum()
    return out


def attach(model, sites, **kw):
    return capscale.attach(model, sites=sites, every=STEPS, window=STEPS, freq_table=table(), dtype=torch.float64, **kw)


# -- scenarios: each returns (rows, monitor rows, reference) on rank 0, None elsewhere ----------------
def _dtensor_tp(rank, world, gated=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    model, twin = Net(gated=gated), Net(gated=gated)
    plan = (
        {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()}
        if gated
        else {"up": ColwiseParallel(), "down": RowwiseParallel()}
    )
    for name, block in model.layers.items():
        if gated or name == "0":  # the plain MLP's layer 1 stays whole: its rows are counted once, not tp times
            parallelize_module(block.mlp, mesh, plan)
    sites = GATED if gated else PATTERNS
    df, mon = run(attach(model, sites), model, batches(0))
    return (df, mon, reference(twin, [batches(0)], sites)) if rank == 0 else None


def dtensor_tp2(rank, world):
    return _dtensor_tp(rank, world)


def dtensor_swiglu_tp2(rank, world):
    return _dtensor_tp(rank, world, gated=True)


def _megatron(model: Net, rank: int, size: int, group) -> Net:
    for block in model.layers.values():
        block.mlp.up = ColumnParallel(block.mlp.up, rank, size)
        block.mlp.down = RowParallel(block.mlp.down, rank, size, group)
    return model


def megatron_tp(rank, world, background=False):
    model = _megatron(Net(), rank, world, None)
    probe = attach(
        model,
        PATTERNS,
        tp_group=dist.group.WORLD,
        monitor_every=None if background else 1,
        monitor_sites=("pre", "post"),
        background=background,
    )
    df, mon = run(probe, model, batches(0))
    return (df, mon, reference(Net(), [batches(0)], PATTERNS)) if rank == 0 else None


def megatron_tp_background(rank, world):
    """The blocks gathered on rank 0 at the window's end, decomposed there by the background worker."""
    return megatron_tp(rank, world, background=True)


def _fused_sites(layout: str) -> dict:
    return {
        "pre": ("layers.{layer}.mlp.gate_up", "output", FUSED[layout]),
        "post": ("layers.{layer}.mlp.down", "input"),
    }


def megatron_fused(rank, world):
    """Megatron-core's layer (attention, gated MLP), the MLP found by structure; its group is the
    layers' own ``tp_group``."""
    model = Net(fused="first")
    for block in model.layers.values():
        block.self_attention = MegatronMixer(block.self_attention, rank, world, dist.group.WORLD)
        block.mlp = MegatronGatedMLP(block.mlp, rank, world, dist.group.WORLD)
    probe = capscale.attach(model, every=STEPS, window=STEPS, freq_table=table(), dtype=torch.float64)
    found = sorted((s.site, s.name) for s in probe.sites)
    df, mon = run(probe, model, batches(0))
    return (df, found, reference(Net(fused="first"), [batches(0)], _fused_sites("first"))) if rank == 0 else None


def megatron_whole_sides(rank, world):
    """Which captured tensors of Megatron-core / Transformer Engine layers are shards, by the layers' own word."""
    from capscale.probe.sites import Site
    from capscale.probe.tensor_parallel import find_shards

    mlp = MegatronGatedMLP(MLP(fused="first"), rank, world, dist.group.WORLD)
    te = nn.Linear(H, F)  # Transformer Engine's flag: a layer copied whole on every rank
    te.parallel_mode, te.tp_group = "duplicated", dist.group.WORLD
    te_column = nn.Linear(H, F // world)
    te_column.parallel_mode, te_column.tp_group = "column", dist.group.WORLD
    solo = [dist.new_group([r]) for r in range(world)][rank]  # tensor parallelism of size 1
    alone = MegatronColumn(nn.Linear(H, F), torch.arange(F), solo)
    cases = {
        "fc1 output": (mlp.linear_fc1, "output"),
        "fc1 input": (mlp.linear_fc1, "input"),
        "fc2 input": (mlp.linear_fc2, "input"),
        "fc2 output": (mlp.linear_fc2, "output"),
        "te duplicated": (te, "output"),
        "te column output": (te_column, "output"),
        "group of one": (alone, "output"),
    }
    sites = [Site(0, "pre", name, m, capture) for name, (m, capture) in cases.items()]
    found = find_shards(sites)
    return {name: i in found for i, name in enumerate(cases)} if rank == 0 else None


def _dtensor_fused(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    model = Net(fused="interleaved")
    for block in model.layers.values():
        parallelize_module(block.mlp, mesh, {"gate_up": ColwiseParallel(), "down": RowwiseParallel()})
    return model


def dtensor_fused_interleaved(rank, world):
    """A fused gate_up whose gate is every other channel: torch's plain Shard(0) keeps each pair on one rank."""
    model = _dtensor_fused(world)
    probe = capscale.attach(model, every=STEPS, window=STEPS, freq_table=table(), dtype=torch.float64)
    df, mon = run(probe, model, batches(0))
    ref = reference(Net(fused="interleaved"), [batches(0)], _fused_sites("interleaved"))
    return (df, mon, ref) if rank == 0 else None


def dtensor_fused_split_pairs(rank, world):
    """The same model over 4 ranks: 9 channels each, a gate-up pair cut in two: every rank refuses."""
    model = _dtensor_fused(world)
    try:
        capscale.attach(model, every=STEPS, window=STEPS, freq_table=table(), dtype=torch.float64)
    except ValueError as exc:
        return str(exc) if rank == 0 else None
    raise AssertionError("attach accepted a fused gate_up split inside its pairs")


def data_x_tensor(rank, world, spectrum="auto", background=False):
    """A 2×2 mesh: data-parallel replicas (other data) of a DTensor tensor-parallel MLP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = Net()
    for block in model.layers.values():
        parallelize_module(block.mlp, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    replica = mesh["dp"].get_local_rank()
    df, mon = run(attach(model, PATTERNS, spectrum=spectrum, background=background), model, batches(replica))
    return (df, mon, reference(Net(), [batches(0), batches(1)], PATTERNS)) if rank == 0 else None


def data_x_tensor_background(rank, world):
    """The 2×2 mesh with the background worker: the writing rank's group assembles the merged blocks,
    the other group (a replica of them) assembles nothing."""
    return data_x_tensor(rank, world, spectrum="exact", background=True)


def data_x_tensor_lanczos(rank, world):
    """The 2×2 mesh by distributed Lanczos: the writing rank's tensor-parallel group computes the
    rows; the other group (a replica of the same merged blocks) skips them."""
    return data_x_tensor(rank, world, spectrum="lanczos")


def fsdp_x_tensor(rank, world):
    """torchtitan's layout: tensor parallel inside, FSDP2 over the data-parallel mesh dimension."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = Net()
    for block in model.layers.values():
        parallelize_module(block.mlp, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    replica = mesh["dp"].get_local_rank()
    df, mon = run(attach(model, PATTERNS), model, batches(replica))
    return (df, mon, reference(Net(), [batches(0), batches(1)], PATTERNS)) if rank == 0 else None


def pipeline(rank, world):
    """Two stages of a 4-layer model, as torchtitan splits it: each deletes the other's layers."""
    full = Net(layers=4)
    stage = copy.deepcopy(full)
    for k in list(stage.layers):
        if (int(k) < 2) != (rank == 0):
            del stage.layers[k]
    if rank == 1:
        stage.embed = None

    def forward(probe, model, ids):
        if rank == 0:
            dist.send(model(ids).contiguous(), dst=1)
        else:
            h = torch.empty(*ids.shape, H, dtype=torch.float64)
            dist.recv(h, src=0)
            with probe.batch(token_ids=ids):  # a later stage sees hidden states: its tokens are given
                model(h)

    out = pipeline.tmp + "/run"
    probe = attach(stage, PATTERNS, out=out, run_config={"label": "pp"})
    df, mon = run(probe, stage, batches(0), forward)
    if rank != 0:
        return None
    import pandas as pd

    written = pd.read_parquet(out + "/spectra.parquet")
    return written, mon, reference(full, [batches(0)], PATTERNS)


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, F), nn.Linear(F, H)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class MoE(nn.Module):
    """Top-1 routing over ``n`` experts, of which this rank holds ``held`` (the rest on other ranks)."""

    def __init__(self, n: int, held: list[int], group=None):
        super().__init__()
        self.router = nn.Linear(H, n, bias=False)
        every = [Expert() for _ in range(n)]
        self.held = held
        self.experts = nn.ModuleList([every[e] for e in held])
        self.group = group
        self.trace = None  # the reference's own record: (expert, token rows, pre, post)

    def forward(self, x):
        flat = x.reshape(-1, H)
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in zip(self.held, self.experts):
            idx = (choice == e).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = expert(flat[idx])
                if self.trace is not None:
                    pre = expert.up(flat[idx])
                    self.trace.append((idx, pre, torch.tanh(pre)))
        if self.group is not None:
            dist.all_reduce(out, group=self.group)  # tokens come back from the experts' ranks
        return out.reshape(x.shape)


class MoEBlock(nn.Module):
    def __init__(self, n, held, group=None):
        super().__init__()
        self.moe = MoE(n, held, group)

    def forward(self, x):
        return x + self.moe(x)


class MoENet(nn.Module):
    def __init__(self, held, group=None, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.pos = nn.Embedding(V, H), nn.Parameter(torch.randn(S, H))
        self.blocks = nn.ModuleList([MoEBlock(n, held, group) for _ in range(LAYERS)])
        self.double()

    def forward(self, ids):
        x = self.embed(ids) + self.pos
        for b in self.blocks:
            x = b(x)
        return x


def expert_parallel(rank, world):
    """4 experts per layer, 2 on each rank; every rank sees the same tokens and runs its own experts."""
    model = MoENet([2 * rank, 2 * rank + 1], dist.group.WORLD)
    df, mon = run(
        capscale.attach(model, every=STEPS, window=STEPS, freq_table=table(), dtype=torch.float64), model, batches(0)
    )
    if rank != 0:
        return None
    twin = MoENet([0, 1, 2, 3])
    rows: dict = {}
    with torch.no_grad():
        for step in batches(0):
            for ids in step:
                for b in twin.blocks:
                    b.moe.trace = []
                twin(ids)
                for layer, b in enumerate(twin.blocks):
                    for idx, pre, post in b.moe.trace:
                        for site, x in (("pre", pre), ("post", post)):
                            rows.setdefault((layer, site), []).append((ids.reshape(-1)[idx], x))
    return df, mon, summarise(rows, {})


def pipeline_x_tensor(rank, world, spectrum="exact", background=False):
    """Two pipeline stages of a 4-layer model, each tensor parallel over 2 ranks (Megatron-style):
    stage 1's tensor-parallel group holds none of the writer's layers. Over 8 ranks, 2 data-parallel
    replicas of that (rank = 4 · replica + 2 · stage + tensor-parallel rank), on other data."""
    replica, stage_of, tp_rank = rank // 4, rank % 4 // 2, rank % 2
    groups = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
    tp = groups[rank // 2]
    full = Net(layers=4)
    model = _megatron(copy.deepcopy(full), tp_rank, 2, tp)
    for k in list(model.layers):
        if (int(k) < 2) != (stage_of == 0):
            del model.layers[k]
    if stage_of == 1:
        model.embed = None

    def forward(probe, m, ids):
        if stage_of == 0:
            dist.send(m(ids).contiguous(), dst=rank + 2)
        else:
            h = torch.empty(*ids.shape, H, dtype=torch.float64)
            dist.recv(h, src=rank - 2)
            with probe.batch(token_ids=ids):
                m(h)

    monitor = {} if background else {"monitor_every": 1, "monitor_sites": ("pre", "post")}
    probe = attach(model, PATTERNS, tp_group=tp, spectrum=spectrum, background=background, **monitor)
    df, mon = run(probe, model, batches(replica), forward)
    data = [batches(r) for r in range(world // 4)]
    return (df, mon, reference(full, data, PATTERNS)) if rank == 0 else None


def pipeline_x_tensor_background(rank, world):
    """Every rank's share of its own group's sites is decomposed on its own worker thread (the
    names of the threads that ran ``decompose`` on each rank come back with the rows)."""
    import threading

    from capscale.probe import decomposition

    real, threads = decomposition.decompose, []

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    decomposition.decompose = spy
    try:
        got = pipeline_x_tensor(rank, world, background=True)
    finally:
        decomposition.decompose = real
    every = [None] * world
    dist.all_gather_object(every, threads)
    return (*got, every) if rank == 0 else None


def pipeline_x_tensor_lanczos(rank, world):
    return pipeline_x_tensor(rank, world, spectrum="lanczos")


def _counting_assemble(rank):
    """Wrap ``sharded.assemble``: on the rank that receives a whole state, how many earlier whole
    states it holds alive at each call."""
    import weakref

    from capscale.probe import sharded

    real, alive, seen = sharded.assemble, [], []

    def assemble(states, widths, group, dst):
        out = real(states, widths, group, dst)
        if out is not None:
            seen.append(sum(r() is not None for r in alive))
            alive.extend(weakref.ref(m.scatter) for m in out)
        return out

    sharded.assemble = assemble
    return real, seen, alive


def megatron_site_at_a_time(rank, world):
    """Four sharded sites × (all + 3 buckets): each whole state gone before the next is assembled."""
    from capscale.probe import sharded

    real, seen, _ = _counting_assemble(rank)
    try:
        model = _megatron(Net(), rank, world, None)
        df, _ = run(attach(model, PATTERNS, tp_group=dist.group.WORLD, spectrum="exact"), model, batches(0))
    finally:
        sharded.assemble = real
    return (df, seen, reference(Net(), [batches(0)], PATTERNS)) if rank == 0 else None


def megatron_background_snapshots(rank, world):
    """``background=True``: the sites are dealt out over the ranks; each rank assembles its sites'
    whole states one at a time, straight into host memory, and hands those very tensors to its
    worker (no second copy), which lets them go; rank 0 writes every row."""
    from capscale.probe import sharded

    real, seen, alive = _counting_assemble(rank)
    handed = []
    try:
        model = _megatron(Net(), rank, world, None)
        probe = attach(model, PATTERNS, tp_group=dist.group.WORLD, spectrum="exact", background=True)
        submit = probe._worker.submit

        def spy(fn, start, states, *rest):
            wholes = [m for e in states if e and e[0] == "wholes" for m in e[2]]
            same = sum(any(m.scatter is r() for r in alive) for m in wholes)
            handed.append((len(wholes), same, sum(r() is not None for r in alive)))
            del wholes
            return submit(fn, start, states, *rest)

        probe._worker.submit = spy
        df, _ = run(probe, model, batches(0))
        note = probe.layout_note
    finally:
        sharded.assemble = real
    after = sum(r() is not None for r in alive)  # the worker is done: every whole state let go
    every = [None] * world
    dist.all_gather_object(every, (seen, handed, after))
    return (df, every, note, reference(Net(), [batches(0)], PATTERNS)) if rank == 0 else None


def megatron_background_worker_error(rank, world):
    """A worker fails on rank 1 while decomposing its share: rank 0's worker gets the error instead
    of rows and raises it; nothing waits for ever."""
    from capscale.probe import decomposition

    real = decomposition.decompose

    def failing(*args, **kwargs):
        if rank == 1:
            raise FloatingPointError("planted")
        return real(*args, **kwargs)

    decomposition.decompose = failing
    model = _megatron(Net(), rank, world, None)
    probe = attach(model, PATTERNS, tp_group=dist.group.WORLD, spectrum="exact", background=True)
    msg = None
    try:
        run(probe, model, batches(0))
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
    finally:
        decomposition.decompose = real
        probe.close(flush=False)
    every = [None] * world
    dist.all_gather_object(every, msg)
    return every if rank == 0 else None


def megatron_lanczos(rank, world, spectrum="lanczos", background=False):
    """``spectrum="lanczos"`` / "hard-only" under tensor parallelism: rows from the blocks, nothing assembled."""
    from capscale.probe import sharded

    real = sharded.assemble

    def refuse(*a, **k):
        raise AssertionError("a whole state was assembled")

    sharded.assemble = refuse
    try:
        model = _megatron(Net(), rank, world, None)
        probe = attach(model, PATTERNS, tp_group=dist.group.WORLD, spectrum=spectrum, background=background)
        df, _ = run(probe, model, batches(0))
    finally:
        sharded.assemble = real
    return (df, reference(Net(), [batches(0)], PATTERNS)) if rank == 0 else None


def megatron_hard_only(rank, world):
    return megatron_lanczos(rank, world, spectrum="hard-only")


def megatron_lanczos_background(rank, world):
    """With ``background=True`` too, Lanczos rows come from the blocks: nothing assembled."""
    return megatron_lanczos(rank, world, background=True)


def megatron_auto_by_writer(rank, world):
    """``spectrum="auto"`` with rank 1 short of host memory: rank 0, which would assemble, decides."""
    from capscale.probe import estimated

    real = estimated.available_host_bytes
    if rank == 1:
        estimated.available_host_bytes = lambda: 1  # on its own, rank 1 would choose Lanczos
    try:
        model = _megatron(Net(), rank, world, None)
        df, _ = run(attach(model, PATTERNS, tp_group=dist.group.WORLD), model, batches(0))
    finally:
        estimated.available_host_bytes = real
    return (df, reference(Net(), [batches(0)], PATTERNS)) if rank == 0 else None


def distributed_lanczos(rank, world):
    """SLQ on row blocks (D = 48 > 32 deflated: the probes run too, uneven blocks 25 + 23) against
    single-process SLQ on the assembled matrix; every rank's numbers bit for bit."""
    from types import SimpleNamespace

    from capscale.probe import sharded
    from capscale.probe.estimated import estimated_row
    from capscale.probe.tensor_parallel import ColumnShard
    from capscale.spectrum._torch import WindowMoments

    d, widths = 48, (25, 23)
    g = torch.Generator().manual_seed(3)
    scale = torch.logspace(0, -2, d, dtype=torch.float64)  # a decaying spectrum: deflation matters
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 0.5 for n in (70, 90)]
    shard = ColumnShard(dist.group.WORLD, sum(widths[:rank]), widths[rank], d, widths)
    acc, whole = shard.accumulator("cpu"), WindowMoments(d, "cpu")
    for x in xs:
        mu = x.mean(0)
        acc.add_rows(x - mu, mu)
        whole.add_rows(x - mu, mu)
    site = SimpleNamespace(layer=0, site="pre", stack="", name="m")
    (row,) = sharded.estimated_rows(site, 0, [acc.moments()], shard, "lanczos", bucketed=False)
    every = [None] * world
    dist.all_gather_object(every, row)
    if rank:
        return None
    ref = estimated_row(whole.moments(), {"step": 0, "layer": 0, "site": "pre", "bucket": "all"}, "lanczos", None)
    return every, ref


TWO = [
    dtensor_tp2,
    dtensor_swiglu_tp2,
    megatron_tp,
    megatron_tp_background,
    pipeline,
    expert_parallel,
    megatron_site_at_a_time,
    megatron_background_snapshots,
    megatron_background_worker_error,
    megatron_lanczos,
    megatron_lanczos_background,
    megatron_hard_only,
    megatron_auto_by_writer,
    distributed_lanczos,
    megatron_fused,
    dtensor_fused_interleaved,
    megatron_whole_sides,
]
FOUR = [
    megatron_tp,
    data_x_tensor,
    fsdp_x_tensor,
    data_x_tensor_lanczos,
    data_x_tensor_background,
    megatron_fused,
    dtensor_fused_split_pairs,
    pipeline_x_tensor,
    pipeline_x_tensor_background,
    pipeline_x_tensor_lanczos,
]


EIGHT = [pipeline_x_tensor]
SCENARIOS = {2: TWO, 4: FOUR, 8: EIGHT}


def _worker(rank, world, tmp, names):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        pipeline.tmp = tmp  # where its run directory goes
        for scenario in [f for f in SCENARIOS[world] if f.__name__ in names]:
            try:
                t0 = time.perf_counter()
                got = scenario(rank, world)
                print(f"{scenario.__name__} rank {rank}: {time.perf_counter() - t0:.1f}s", flush=True)
            except Exception:
                with open(f"{tmp}/{scenario.__name__}.{rank}.err", "w") as f:
                    f.write(traceback.format_exc())
                raise
            if got is not None:
                with open(f"{tmp}/{scenario.__name__}.pkl", "wb") as f:
                    pickle.dump(got, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp(f"world{world}")
    names = [f.__name__ for f in SCENARIOS[world]]
    import torch.distributed.fsdp  # noqa: F401  (once here, not in each child: seconds)
    import torch.distributed.tensor.parallel  # noqa: F401

    try:
        # fork: the children inherit torch and capscale imported (spawn re-imports them: ~10 s each)
        mp.start_processes(_worker, args=(world, str(tmp), names), nprocs=world, join=True, start_method="fork")
    except Exception as exc:  # each test reports its own scenario's error below
        (tmp / "spawn.err").write_text(str(exc))
    return tmp


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return _spawn(8, tmp_path_factory)


def check_rows(df, ref, layers):
    """Every (layer, site, bucket) row once, equal to the reference in float64."""
    assert not df.duplicated(["step", "layer", "site", "bucket"]).any()
    keys = {k for k in ref if k[0] != "monitor"}
    assert {(r.layer, r.site, r.bucket) for r in df.itertuples()} == keys
    assert sorted({k[0] for k in keys}) == layers
    for r in df.itertuples():
        n, lam = ref[(r.layer, r.site, r.bucket)]
        assert r.n_samples == n and r.dim == F
        assert r.eigenvalues is not None, (r.layer, r.site, r.bucket)
        got = np.sort(np.asarray(r.eigenvalues))[::-1]
        np.testing.assert_allclose(got, np.clip(lam, 0, None), rtol=0, atol=1e-9 * lam[0])
        p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
        np.testing.assert_allclose(r.hard_rank, 1 / (p**2).sum(), rtol=1e-9)
        p = p[p > 1e-15]
        np.testing.assert_allclose(r.soft_rank, np.exp(-(p * np.log(p)).sum()), rtol=1e-9)


def test_dtensor_colwise_rowwise_tp2_equals_unsharded(two):
    """Layer 0 parallelised (ColwiseParallel up, RowwiseParallel down), layer 1 left whole on both ranks."""
    df, _, ref = result(two, "dtensor_tp2")
    check_rows(df, ref, [0, 1])


def test_dtensor_swiglu_w1_w3_w2_tp2_equals_unsharded(two):
    df, _, ref = result(two, "dtensor_swiglu_tp2")
    check_rows(df, ref, [0, 1])


def _check_monitor(mon, ref):
    """The monitor's hard rank from per-block scalars (no eigvalsh) == the eigenvalue route, to 1e-10."""
    assert len(mon) == STEPS * LAYERS * 2
    for r in mon.itertuples():
        assert r.dim == F
        np.testing.assert_allclose(r.hard_rank, ref[("monitor", r.step, r.layer, r.site)], rtol=1e-10)


def test_megatron_column_row_parallel_tp2_equals_unsharded(two):
    df, mon, ref = result(two, "megatron_tp")
    check_rows(df, ref, [0, 1])
    _check_monitor(mon, ref)


def test_megatron_tp2_background_decomposition_equals_unsharded(two):
    df, mon, ref = result(two, "megatron_tp_background")
    check_rows(df, ref, [0, 1])
    assert mon.empty


def test_megatron_fused_gate_up_tp2_found_and_equal_to_unsharded(two):
    """Megatron-core's gated fc1 ([gate_r | up_r] on each rank) is found by structure, with no
    ``tp_group`` given, and its gate's rows equal the unsharded model's first half of the fused output."""
    df, found, ref = result(two, "megatron_fused")
    assert found == [("post", f"layers.{i}.mlp.linear_fc2") for i in "01"] + [
        ("pre", f"layers.{i}.mlp.linear_fc1") for i in "01"
    ]
    check_rows(df, ref, [0, 1])


def test_megatron_and_transformer_engine_layers_say_which_side_is_a_shard(two):
    """Without ``tp_group``: a column layer's output and a row layer's input are shards; their other
    sides, a duplicated layer and a layer whose group is one rank are whole."""
    assert result(two, "megatron_whole_sides") == {
        "fc1 output": True,
        "fc1 input": False,
        "fc2 input": True,
        "fc2 output": False,
        "te duplicated": False,
        "te column output": True,
        "group of one": False,
    }


def test_megatron_fused_gate_up_uneven_tp4_equals_unsharded(four):
    """Gate shards of 5, 5, 5 and 3 channels (fused outputs of 10, 10, 10, 6)."""
    df, _, ref = result(four, "megatron_fused")
    check_rows(df, ref, [0, 1])


def test_dtensor_fused_interleaved_gate_up_tp2_equals_unsharded(two):
    df, _, ref = result(two, "dtensor_fused_interleaved")
    check_rows(df, ref, [0, 1])


def test_fused_gate_up_split_inside_its_pairs_is_refused_on_every_rank(four):
    msg = result(four, "dtensor_fused_split_pairs")
    assert "(9, 9, 9, 9)" in msg and "whole gate and up halves" in msg


def test_megatron_uneven_shards_tp4_equals_unsharded(four):
    df, mon, ref = result(four, "megatron_tp")
    check_rows(df, ref, [0, 1])
    _check_monitor(mon, ref)


def test_two_by_two_data_by_tensor_mesh_equals_unsharded(four):
    df, _, ref = result(four, "data_x_tensor")
    check_rows(df, ref, [0, 1])


def test_two_by_two_data_by_tensor_mesh_background_equals_unsharded(four):
    df, _, ref = result(four, "data_x_tensor_background")
    check_rows(df, ref, [0, 1])


def test_fsdp2_over_data_with_tensor_parallel_inside_equals_unsharded(four):
    df, _, ref = result(four, "fsdp_x_tensor")
    check_rows(df, ref, [0, 1])


def test_pipeline_by_tensor_parallel_writes_every_stage_once(four):
    """2 stages × 2 tensor-parallel ranks: stage 1's sharded layers reach the writer (rank 0), once."""
    df, mon, ref = result(four, "pipeline_x_tensor")
    check_rows(df, ref, [0, 1, 2, 3])
    assert len(mon) == STEPS * 4 * 2  # every stage's monitor records, on the writer
    for r in mon.itertuples():
        np.testing.assert_allclose(r.hard_rank, ref[("monitor", r.step, r.layer, r.site)], rtol=1e-10)


def test_data_by_pipeline_by_tensor_parallel_writes_every_stage_once(eight):
    """2 replicas × 2 stages × 2 tensor-parallel ranks: each stage's blocks merged over its replicas
    only (not with the other stage's), every layer once, equal to the unsharded model on both
    replicas' data; the monitor too."""
    df, mon, ref = result(eight, "pipeline_x_tensor")
    check_rows(df, ref, [0, 1, 2, 3])
    assert len(mon) == STEPS * 4 * 2
    for r in mon.itertuples():
        np.testing.assert_allclose(r.hard_rank, ref[("monitor", r.step, r.layer, r.site)], rtol=1e-10)


def test_pipeline_by_tensor_parallel_background_writes_every_stage_once(four):
    """Background: each stage's group deals its 4 sites over its 2 ranks, and every rank's worker
    (never its training thread) decomposes its 2 sites' states; rank 0 writes every row."""
    df, _, ref, threads = result(four, "pipeline_x_tensor_background")
    check_rows(df, ref, [0, 1, 2, 3])
    for rank, names in enumerate(threads):
        assert len(names) == 2 and all(n.startswith("capscale-spectra") for n in names), (rank, names)


def test_pipeline_by_tensor_parallel_lanczos_writes_every_stage_once(four):
    df, _, ref = result(four, "pipeline_x_tensor_lanczos")
    assert not df.duplicated(["step", "layer", "site", "bucket"]).any()
    assert sorted(set(df.layer)) == [0, 1, 2, 3]
    for r in df.itertuples():
        n, lam = ref[(r.layer, r.site, r.bucket)]
        p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
        assert r.n_samples == n
        np.testing.assert_allclose(r.hard_rank, 1 / (p**2).sum(), rtol=1e-9)  # exact in Lanczos too


def test_pipeline_stages_write_every_layer_once_with_global_indices(two):
    """Both stages' rows in one run directory's spectra.parquet (written by rank 0), each once."""
    df, _, ref = result(two, "pipeline")
    check_rows(df, ref, [0, 1, 2, 3])


def test_experts_split_over_two_ranks_pool_to_the_single_processresult(two):
    df, _, ref = result(two, "expert_parallel")
    check_rows(df, ref, [0, 1])


def test_tensor_parallel_window_end_holds_one_whole_state_at_a_time(two):
    """Rank 0 assembles one whole state, decomposes it and lets it go before the next (the old
    route assembled every site's buckets first: its earlier states were all alive)."""
    df, seen, ref = result(two, "megatron_site_at_a_time")
    # 2 layers × (pre, post) × (all, head, mid, tail), one window: one state assembled at a time
    assert seen == [0] * 16
    check_rows(df, ref, [0, 1])


def test_tensor_parallel_background_assembles_each_whole_state_once_into_the_worker_snapshot(two):
    """``background=True``: the 4 sites (2 layers × (pre, post)) are dealt out over the 2 ranks; each
    assembles one whole state per call (its 2 sites × 3 buckets; its worker merges "all" from them)
    straight into host memory; its worker gets those tensors themselves, so a rank holds half a
    window's stored states whole (rank 0 held all of them before), no second copy; they are gone
    once the workers are done, and rank 0 writes every row. Bucket rows equal the foreground
    path's bit for bit, "all" to round-off."""
    df, every, _, ref = result(two, "megatron_background_snapshots")
    for seen, handed, after in every:  # each rank: 2 of the 4 sites × 3 buckets
        assert seen == list(range(6))  # the earlier states are alive: they are the worker's snapshots
        assert handed == [(6, 6, 6)]  # (snapshots handed, of which assembled tensors, whole states alive)
        assert after == 0
    check_rows(df, ref, [0, 1])
    fore, _, _ = result(two, "megatron_site_at_a_time")
    key = ["layer", "site", "bucket"]
    a, b = df.sort_values(key).reset_index(drop=True), fore.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == 16
    for x, y in zip(a.itertuples(), b.itertuples()):
        assert (x.layer, x.site, x.bucket) == (y.layer, y.site, y.bucket)
        if x.bucket == "all":  # merged from whole states here, block by block there
            np.testing.assert_allclose(x.eigenvalues, y.eigenvalues, rtol=0, atol=1e-12 * max(y.eigenvalues))
            np.testing.assert_allclose(x.soft_rank, y.soft_rank, rtol=1e-12)
        else:
            assert np.array_equal(np.asarray(x.eigenvalues), np.asarray(y.eigenvalues))
            assert x.soft_rank == y.soft_rank and x.hard_rank == y.hard_rank


def test_a_failing_worker_on_another_rank_is_raised_on_the_writer_and_nothing_hangs(two):
    writer, other = result(two, "megatron_background_worker_error")
    assert "rank 1: FloatingPointError: planted" in writer
    assert "planted" in other


def test_auto_layout_sizes_tensor_parallel_sites_by_their_blocks(two):
    """``states="auto"`` counts a sharded site's row blocks (width × D per bucket), not D², and no
    device snapshot of them under background (their snapshot is the assembled host state)."""
    note = result(two, "megatron_background_snapshots")[2]
    blocks = LAYERS * 2 * 3 * (F // 2) * F * 8  # sites × (head, mid, tail) × width × D float64
    gb = re.search(r"float64 states, ([0-9.e+-]+) GB", note).group(1)
    assert gb == f"{blocks / 1e9:.3g}", note
    assert f"row blocks {blocks / 1e9:.3g} GB, on the device in either layout" in note


def test_tensor_parallel_background_lanczos_rows_without_assembling(two):
    check_lanczos_rows(*result(two, "megatron_lanczos_background"))


def check_lanczos_rows(df, ref):
    """Every (layer, site, bucket) row once, by Lanczos, equal to the reference's eigenvalue ranks."""
    assert not df.duplicated(["step", "layer", "site", "bucket"]).any()
    assert {(r.layer, r.site, r.bucket) for r in df.itertuples()} == {k for k in ref if k[0] != "monitor"}
    assert (df.spectrum_method == "lanczos").all() and df.eigenvalues.isna().all()
    for r in df.itertuples():
        n, lam = ref[(r.layer, r.site, r.bucket)]
        p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
        assert r.n_samples == n
        np.testing.assert_allclose(r.hard_rank, 1 / (p**2).sum(), rtol=1e-9)
        np.testing.assert_allclose(r.renyi_rank_inf, 1 / p.max(), rtol=1e-9)
        p = p[p > 1e-15]
        np.testing.assert_allclose(r.soft_rank, np.exp(-(p * np.log(p)).sum()), rtol=1e-8)


def test_tensor_parallel_lanczos_rows_without_assembling(two):
    """F = 18 < 32 deflated directions: the quadrature is exact, so the soft rank equals eigvalsh's."""
    check_lanczos_rows(*result(two, "megatron_lanczos"))


def test_two_by_two_data_by_tensor_mesh_lanczos_equals_unsharded(four):
    df, _, ref = result(four, "data_x_tensor_lanczos")
    check_lanczos_rows(df, ref)


def test_tensor_parallel_hard_only_rows_without_assembling(two):
    df, ref = result(two, "megatron_hard_only")
    assert len(df) == LAYERS * 2 * 4 and (df.spectrum_method == "hard-only").all()
    for r in df.itertuples():
        _, lam = ref[(r.layer, r.site, r.bucket)]
        np.testing.assert_allclose(r.hard_rank, lam.sum() ** 2 / (lam**2).sum(), rtol=1e-9)
        assert np.isnan(r.soft_rank)


def test_tensor_parallel_auto_spectrum_is_the_writing_ranks_choice(two):
    df, ref = result(two, "megatron_auto_by_writer")
    assert (df.spectrum_method == "exact").all()
    check_rows(df, ref, [0, 1])


def test_distributed_lanczos_equals_single_process_lanczos(two):
    every, ref = result(two, "distributed_lanczos")
    assert every[0].keys() == every[1].keys()
    for k, v in every[0].items():  # both ranks ran the same recurrence on the same numbers
        assert v == every[1][k] or (v != v and every[1][k] != every[1][k]), k
    row = every[0]
    assert row["spectrum_method"] == "lanczos" and row["soft_rank_stderr"] > 0  # the probes ran
    for k in ("soft_rank", "soft_rank_stderr", "renyi_rank_0_5", "renyi_rank_inf", "lambda_max", "hard_rank", "trace"):
        np.testing.assert_allclose(row[k], ref[k], rtol=1e-9, err_msg=k)
