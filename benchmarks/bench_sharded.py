"""Tensor-parallel (sharded) states against replicated ones, on CPU with gloo, in one run.

For each width D and rank count tp, one MLP layer (H = 64 → D → 64) runs its FFN as
Megatron-style column/row-parallel linears over tp gloo processes (``sharded``: each rank
keeps its D/tp rows of the float64 state) and, as the baseline, whole on every rank
(``replicated``: every rank keeps the whole D × D state, as without tensor parallelism),
on the same batches. Printed per (D, tp, layout), from rank 0:

  state MB/rank    float64 state bytes one rank holds (the probe's accumulators)
  window +MB       peak resident memory growth over the measured window (the most of any rank)
  window s         one measured step: forwards (all-gather + block GEMM for sharded),
                   the cross-rank reduction and the hard rank (tr(C)²/‖C‖²_F; from per-block
                   scalars when sharded), the monitor level of ``attach``
  rows s           a full window's end: sharded = blocks gathered on rank 0, one state at a time, + eigvalsh there;
                   replicated = all-reduce of the whole state + eigvalsh on every rank
                   (only for D in --eig-dims; eigvalsh at 8,192 takes minutes on one core)
  rows +MB         peak resident memory growth after it, on rank 0 / the most of the other ranks
  lanczos s        with --lanczos-dims: a full window's end with spectrum="lanczos":
                   sharded = distributed SLQ (each rank's rows times the probe blocks,
                   all-gathered; nothing D × D assembled); replicated = all-reduce of the
                   whole state + single-process SLQ on every rank; soft rank compared to 1e-9

and the ratio sharded / replicated of the state bytes (≈ 1/tp). One fresh process group
per case (forked), one thread per rank; few rows, so a run takes a few minutes on 2 cores.

With --background-dims, a background window end (``background=True``, exact spectrum) of a
model of --layers sharded layers, two ways: the sites dealt out over the ranks (the probe's
route: each rank assembles and decomposes its share, rows sent to rank 0 over a gloo group)
against the baseline, every site assembled and decomposed on rank 0 (the route before,
``decomposition._owner`` replaced). Printed per rank: peak RSS growth from the window's end
to its rows, and rank 0's seconds until every row is in (``probe.wait()``).

    python benchmarks/bench_sharded.py [--dims 4096 8192] [--ranks 2 4] [--rows 256] [--eig-dims 4096]
        [--lanczos-dims 4096] [--background-dims 3072 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as fn
from torch import nn

import capscale
from capscale.probe.probe import NothingCapturedWarning

H = 64


class ColumnParallel(nn.Module):
    def __init__(self, weight: torch.Tensor, rank: int, size: int):
        super().__init__()
        w = weight.shape[0] // size
        self.weight = nn.Parameter(weight[rank * w : (rank + 1) * w].clone())

    def forward(self, x):
        return fn.linear(x, self.weight)


class RowParallel(nn.Module):
    input_is_parallel = True

    def __init__(self, weight: torch.Tensor, rank: int, size: int):
        super().__init__()
        w = weight.shape[1] // size
        self.weight = nn.Parameter(weight[:, rank * w : (rank + 1) * w].clone())

    def forward(self, x):
        y = fn.linear(x, self.weight)
        dist.all_reduce(y)
        return y


class Block(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def model(d: int, rank: int, size: int, sharded: bool) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(d, H, generator=g) / H**0.5, torch.randn(H, d, generator=g) / d**0.5
    if sharded:
        block = Block(ColumnParallel(up, rank, size), RowParallel(down, rank, size))
    else:
        block = Block(nn.Linear(H, d, bias=False), nn.Linear(d, H, bias=False))
        block.up.weight.data, block.down.weight.data = up, down
    return nn.ModuleDict({"layers": nn.ModuleList([block])})


class Root(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner["layers"][0](x)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _window_end(net, batches, kw, rank, **more) -> tuple[float, float, object]:
    """A full window's end on rank 0: (seconds of its ``probe.step()``, its RSS growth MB, rows or None)."""
    probe = capscale.attach(net, every=1, start_step=2, **kw, **more)
    with torch.no_grad():
        for x in batches:
            net(x)
    dist.barrier()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    probe.step()
    took = time.perf_counter() - t0  # rank 0's time: the gather (or all-reduce) and the ranks
    grew = _rss_mb() - rss0
    dist.barrier()
    df = probe.compute()  # every rank: it is collective (rows of sharded sites: rank 0's)
    probe.close()
    return took, grew, df if rank == 0 else None


def worker(rank: int, world: int, tmp: str, d: int, sharded: bool, rows: int, eig: bool, slq: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", NothingCapturedWarning)  # the empty window open at close()
    try:
        net = Root(model(d, rank, world, sharded))
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(2, rows // 2, H, generator=g) for _ in range(2)]  # the same on every rank
        # float64 GEMMs: the two layouts and the two hard-rank routes are then compared to 1e-9
        kw = {"sites": {"pre": "inner.layers.{layer}.up"}, "tp_group": dist.group.WORLD if sharded else None}
        kw["dtype"] = torch.float64
        rss0 = _rss_mb()
        # Monitor level only: accumulate + reduce + hard rank, no eigendecomposition.
        probe = capscale.attach(net, every=10**9, start_step=1, monitor_every=1, monitor_sites=("pre",), **kw)
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                net(x)
        state = sum(a.scatter.numel() * a.scatter.element_size() for accs in probe._pool.values() for a in accs)
        probe.step()  # closes the monitor window
        dist.barrier()
        window = time.perf_counter() - t0
        hard = float(probe.monitor_frame().hard_rank.iloc[0])
        probe.close()
        out = {"state_mb": state / 2**20, "window_s": window, "hard_rank": hard, "rss_window": _rss_mb() - rss0}
        if eig:  # a full window: rows (eigvalsh) on the writing rank (sharded) or every rank (replicated)
            probe = capscale.attach(net, every=1, start_step=2, **kw)
            with torch.no_grad():
                for x in batches:
                    net(x)
            dist.barrier()
            t0 = time.perf_counter()
            probe.step()
            rows_s = time.perf_counter() - t0  # rank 0's time: the gather (or all-reduce) and eigvalsh
            dist.barrier()
            df = probe.compute()  # every rank: it is collective (rows of sharded sites: rank 0's)
            if rank == 0:
                out["rows_s"] = rows_s
                out["hard_rank_eig"] = float(df.hard_rank.iloc[0])
            probe.close()
        if slq:
            took, grew, df = _window_end(net, batches, kw, rank, spectrum="lanczos")
            if rank == 0:
                out.update(lanczos_s=took, lanczos_mb=grew, soft_rank=float(df.soft_rank.iloc[0]))
                out["soft_rank_stderr"] = float(df.soft_rank_stderr.iloc[0])
        peaks = [None] * world
        dist.all_gather_object(peaks, (out["rss_window"], _rss_mb() - rss0))
        out["rss_window"] = max(p[0] for p in peaks)
        out["rss_rows"] = (peaks[0][1], max((p[1] for p in peaks[1:]), default=0.0))
        if rank == 0:
            Path(tmp, "out.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def background_worker(rank: int, world: int, tmp: str, d: int, layers: int, rows: int, dealt: bool) -> None:
    """One background window end of ``layers`` sharded layers: per-rank peak RSS growth, rank 0's time to rows."""
    from capscale.probe import decomposition

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", NothingCapturedWarning)
    if not dealt:  # the baseline: every site to the group's first rank, the writer
        decomposition._owner = lambda ranks, k: ranks[0]
    try:
        blocks = [model(d, rank, world, True)["layers"][0] for _ in range(layers)]
        net = nn.Sequential(*blocks)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(2, rows // 2, H, generator=g) for _ in range(2)]
        kw = {"sites": {"pre": "{layer}.up"}, "tp_group": dist.group.WORLD, "dtype": torch.float64}
        probe = capscale.attach(net, every=1, start_step=2, background=True, spectrum="exact", **kw)
        with torch.no_grad():
            for x in batches:
                net(x)
        dist.barrier()
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        probe.step()  # the window's end: assembly (collective), then the workers
        ended = time.perf_counter() - t0
        probe.wait()  # rank 0: every row in
        took = time.perf_counter() - t0
        grew = _rss_mb() - rss0
        df = probe.compute()
        every = [None] * world
        dist.all_gather_object(every, grew)
        probe.close()
        if rank == 0:
            out = {
                "rows_s": took,
                "step_s": ended,
                "rss": every,
                "rows": len(df),
                "hard": sorted(df.hard_rank.round(9).tolist()),
            }
            Path(tmp, "out.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def background_case(d: int, world: int, layers: int, rows: int, dealt: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, tmp, d, layers, rows, dealt)
        mp.start_processes(background_worker, args=args, nprocs=world, start_method="fork")
        return json.loads(Path(tmp, "out.json").read_text())


def case(d: int, world: int, sharded: bool, rows: int, eig: bool, slq: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, tmp, d, sharded, rows, eig, slq)
        mp.start_processes(worker, args=args, nprocs=world, start_method="fork")
        return json.loads(Path(tmp, "out.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rows", type=int, default=256, help="rows per measured step (two batches)")
    ap.add_argument("--eig-dims", type=int, nargs="*", default=[4096], help="widths whose rows (eigvalsh) are timed")
    ap.add_argument(
        "--lanczos-dims", type=int, nargs="*", default=[], help="widths whose spectrum='lanczos' window end is timed"
    )
    ap.add_argument("--background-dims", type=int, nargs="*", default=[], help="widths of the background case")
    ap.add_argument("--layers", type=int, default=4, help="sharded layers of the background case")
    args = ap.parse_args()
    if args.background_dims:
        background(args)
        return
    head = (
        f"{'D':>6} {'tp':>3} {'layout':>10} {'state MB/rank':>14} {'window +MB':>11} {'window s':>9} "
        f"{'rows +MB r0/others':>19} {'rows s':>8} {'hard rank':>10}"
    )
    print(head)
    print("-" * len(head))
    ratios, slq = [], []
    for d in args.dims:
        for world in args.ranks:
            got = {}
            for sharded in (False, True):
                r = got[sharded] = case(d, world, sharded, args.rows, d in args.eig_dims, d in args.lanczos_dims)
                rows = f"{r['rows_s']:8.2f}" if "rows_s" in r else f"{'-':>8}"
                mem = f"{r['rss_rows'][0]:.0f} / {r['rss_rows'][1]:.0f}" if "rows_s" in r else "-"
                print(
                    f"{d:>6} {world:>3} {'sharded' if sharded else 'replicated':>10} {r['state_mb']:14.1f} "
                    f"{r['rss_window']:11.0f} {r['window_s']:9.2f} {mem:>19} {rows} {r['hard_rank']:10.4f}",
                    flush=True,
                )
                if "hard_rank_eig" in r:  # the scalar route against the eigenvalue route
                    assert abs(r["hard_rank"] - r["hard_rank_eig"]) <= 1e-9 * r["hard_rank_eig"], r
            assert abs(got[True]["hard_rank"] - got[False]["hard_rank"]) <= 1e-9 * got[False]["hard_rank"]
            ratios.append((d, world, got[True]["state_mb"] / got[False]["state_mb"]))
            if "lanczos_s" in got[True]:
                a, b = got[True], got[False]
                assert abs(a["soft_rank"] - b["soft_rank"]) <= 1e-9 * b["soft_rank"], (a, b)
                slq.append((d, world, a, b))
    print()
    for d, world, ratio in ratios:
        print(f"D={d} tp={world}: state per rank sharded / replicated = {ratio:.3f} (1/tp = {1 / world:.3f})")
    for d, world, a, b in slq:
        print(
            f"D={d} tp={world}: lanczos window end, rank 0: sharded {a['lanczos_s']:.2f} s (+{a['lanczos_mb']:.0f} MB)"
            f" / replicated {b['lanczos_s']:.2f} s (+{b['lanczos_mb']:.0f} MB) = {a['lanczos_s'] / b['lanczos_s']:.2f};"
            f" soft rank {a['soft_rank']:.6f} ± {a['soft_rank_stderr']:.2g} (equal to 1e-9)"
        )


def background(args) -> None:
    """The background window end, dealt out against all on rank 0, per width and rank count."""
    for d in args.background_dims:
        for world in args.ranks:
            got = {dealt: background_case(d, world, args.layers, args.rows, dealt) for dealt in (False, True)}
            assert got[True]["hard"] == got[False]["hard"] and got[True]["rows"] == args.layers, got
            for dealt, r in got.items():
                mem = " / ".join(f"{m:.0f}" for m in r["rss"])
                print(
                    f"D={d} tp={world} {args.layers} sites, {'dealt out' if dealt else 'all on rank 0'}: "
                    f"window end (assembly) {r['step_s']:.2f} s, rows in {r['rows_s']:.2f} s on rank 0; "
                    f"peak RSS growth per rank {mem} MB",
                    flush=True,
                )
            a, b = got[True], got[False]
            print(
                f"D={d} tp={world}: dealt / all on rank 0: time {a['rows_s'] / b['rows_s']:.2f}, "
                f"rank 0 memory {a['rss'][0] / b['rss'][0]:.2f}, largest rank {max(a['rss']) / max(b['rss']):.2f}"
            )


if __name__ == "__main__":
    main()
