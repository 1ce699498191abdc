"""The probe under the tricks real training code uses: activation checkpointing (forward hooks fire
again while backward recomputes), gradient accumulation (several forwards per step), FSDP2
``fully_shard`` (2 gloo processes) and ``torch.compile`` with them: every token counted once."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_probe_sites import ToyLM
from torch.utils.checkpoint import checkpoint

import capscale

torch.set_num_threads(1)
V = 50
COLS = ("n_samples", "soft_rank", "hard_rank", "renyi_rank_inf", "trace")


class CheckpointedLM(ToyLM):
    """ToyLM whose blocks run under ``torch.utils.checkpoint``: recomputed during backward."""

    def forward(self, ids, targets=None):
        x = self.emb(ids)
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        logits = self.head(x)
        return nn_loss(logits, targets)


def nn_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class PlainLM(ToyLM):
    def forward(self, ids, targets=None):
        return nn_loss(super().forward(ids), targets)


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls()


def data(steps=3, micro=2, b=2, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, V, (b, s), generator=g) for _ in range(micro)] for _ in range(steps)]


def train(model, batches, *, merge_micro=False, **attach_kw):
    """A training loop with gradient accumulation: ``micro`` forwards+backwards per optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = capscale.attach(model, every=1, dtype=torch.float64, **attach_kw)
    for micro in batches:
        if merge_micro:
            micro = [torch.cat(micro)]
        for ids in micro:
            loss = model(ids, ids.roll(-1, 1)) / len(micro)
            loss.backward()
        opt.step()
        opt.zero_grad()
        probe.step()
    df = probe.compute()
    probe.close()
    return df.sort_values(["step", "layer", "site", "bucket"]).reset_index(drop=True)


def assert_same(a, b):
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.n_samples, b.n_samples)
    for col in COLS[1:]:
        np.testing.assert_allclose(a[col], b[col], rtol=1e-6)


def test_activation_checkpointing_counts_each_token_once():
    batches = data()
    plain = train(make(PlainLM), batches)
    ckpt = train(make(CheckpointedLM), batches)
    assert (plain.n_samples == 2 * 2 * 8).all()  # two micro-batches of 2×8 tokens per step
    assert_same(ckpt, plain)


def test_gradient_accumulation_counts_every_micro_batch_once():
    batches = data()
    accumulated = train(make(PlainLM), batches)
    one_forward = train(make(PlainLM), batches, merge_micro=True)  # same tokens, one forward per step
    assert_same(accumulated, one_forward)


def test_compile_with_checkpointing_and_accumulation():
    batches = data(steps=2)
    plain = train(make(PlainLM), batches)
    compiled = torch.compile(make(CheckpointedLM), backend="aot_eager")  # traces the backward too
    assert_same(train(compiled, batches), plain)


def _fsdp_worker(rank, world, tmp):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
        mine = [[step[i] for i in range(rank, len(step), world)] for step in data(micro=4)]
        for compiled in (False, True):
            model = make(PlainLM)
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if compiled:
                model = torch.compile(model, backend="eager")
            train(model, mine).to_parquet(f"{tmp}/rank{rank}_{compiled}.parquet")
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_processes_equal_one_process_also_compiled(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    try:
        mp.spawn(_fsdp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessRaisedException as exc:
        if "fully_shard" in str(exc) and ("not supported" in str(exc) or "CPU" in str(exc)):
            pytest.skip(f"FSDP2 on CPU/gloo unavailable here: {str(exc).splitlines()[-1]}")
        raise
    # one process on all the data: each step's four micro-batches (the ranks hold two each)
    single = train(make(PlainLM), data(micro=4))
    for r in range(2):
        for compiled in (False, True):
            df = pd.read_parquet(tmp_path / f"rank{r}_{compiled}.parquet")
            assert_same(df.sort_values(["step", "layer", "site", "bucket"]).reset_index(drop=True), single)
