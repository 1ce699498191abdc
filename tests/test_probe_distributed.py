"""Exact data-parallel reduction: 2 gloo processes over disjoint shards == one process on all data."""

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_probe_sites import toy

import capscale
from capscale.probe import JSONLSink
from capscale.spectrum import FrequencyTable

V = 50
STEPS = 2


def table():
    counts = np.full(V, 6, dtype=np.int64)  # enough TAIL mass that the MID cut falls inside the 60s
    counts[:2] = 400
    counts[2:6] = 60
    return FrequencyTable(counts)  # HEAD {0, 1}, MID {2..5}, TAIL the rest


def shards():
    """Per step, per rank: a list of id batches. Rank 1 never sees a MID token and has one batch fewer."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        r0 = [torch.randint(0, V, (2, 6), generator=g) for _ in range(2)]
        r1 = torch.randint(6, V, (3, 5), generator=g)
        r1[0, :2] = 0
        out.append([r0, [r1]])
    return out


def measure(model, batches_per_step, **kw):
    probe = capscale.attach(model, every=STEPS, window=STEPS, freq_table=table(), dtype=torch.float64, **kw)
    for batches in batches_per_step:
        for b in batches:
            model(b)
        probe.step()
    df = probe.compute()
    probe.close()
    return df


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(toy())
        mine = [step[rank] for step in shards()]
        df = measure(model, mine, sinks=[JSONLSink(f"{tmp}/rank{rank}.jsonl")])
        df.to_parquet(f"{tmp}/rank{rank}.parquet")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = measure(toy(), [step[0] + step[1] for step in shards()])
    r0 = pd.read_parquet(tmp_path / "rank0.parquet")
    r1 = pd.read_parquet(tmp_path / "rank1.parquet")
    assert (tmp_path / "rank0.jsonl").exists() and not (tmp_path / "rank1.jsonl").exists()  # one writer
    assert list(r0.module.unique()) == [f"module.{m}" for m in single.module.unique()]  # DDP's prefix
    assert len(r0) == len(single) == 2 * 2 * 4
    for df in (r0, r1):  # every rank holds the reduced records, not rank 0 only
        np.testing.assert_array_equal(df.n_samples, single.n_samples)
        for col in ("soft_rank", "hard_rank", "renyi_rank_0_5", "trace", "lambda_max"):
            np.testing.assert_allclose(df[col], single[col], rtol=1e-9)
        for a, b in zip(df.eigenvalues, single.eigenvalues):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * max(b))
    mid = single[single.bucket == "mid"]
    assert (mid.n_samples > 0).all()  # present in total, absent on rank 1
