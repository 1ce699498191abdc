"""transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")``, DTensor weights) on
two gloo ranks: every row equals the unsharded model's.

Phi-3 fuses gate and up (``gate_up_proj``, its plan ``colwise_gather_output``: the output is
whole again on every rank, the weight a column shard); Llama keeps them apart (``colwise`` /
``rowwise``: the activations are column shards). A tiny model of each is saved with
``save_pretrained`` (no download) and loaded on each rank with the plan its config declares.
"""

from __future__ import annotations

import datetime
import os
import pickle
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import capscale

T = pytest.importorskip("transformers")

FAMILIES = ("phi3", "llama")


def _tiny(kind: str):
    torch.manual_seed(0)
    shape = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    if kind == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**shape))
    return T.LlamaForCausalLM(T.LlamaConfig(**shape))


def _ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _rows(model) -> object:
    probe = capscale.attach(model, every=1, dtype=torch.float64, mode="any")
    with torch.no_grad():
        model(_ids())
    df = probe.compute()
    probe.close()
    return df.sort_values(["layer", "site", "bucket"]).reset_index(drop=True)


def _worker(rank: int, world: int, tmp: str) -> None:
    # transformers reads the layout from the launcher's variables (torchrun sets them)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    try:
        for kind in FAMILIES:
            try:
                model = T.AutoModelForCausalLM.from_pretrained(f"{tmp}/{kind}", tp_plan="auto", dtype=torch.float64)
                mlp = model.model.layers[0].mlp
                up = mlp.gate_up_proj if kind == "phi3" else mlp.gate_proj
                kinds = [str(getattr(m.weight, "placements", "local")) for m in (up, mlp.down_proj)]
                df = _rows(model)
                if rank == 0:
                    with open(f"{tmp}/{kind}.pkl", "wb") as f:
                        pickle.dump((df, kinds), f)
            except Exception:
                with open(f"{tmp}/{kind}.{rank}.err", "w") as f:
                    f.write(traceback.format_exc())
                raise
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("hf_tp")
    reference = {}
    for kind in FAMILIES:
        model = _tiny(kind)
        model.save_pretrained(tmp / kind)
        reference[kind] = _rows(model.double().eval())  # float64 throughout: only round-off differs
    try:
        mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, join=True, start_method="fork")
    except Exception as exc:  # each test reports its own family's error
        (tmp / "spawn.err").write_text(str(exc))
    return tmp, reference


@pytest.mark.parametrize("kind", FAMILIES)
def test_transformers_tensor_parallel_rows_equal_the_unsharded_model(runs, kind):
    tmp, reference = runs
    path = tmp / f"{kind}.pkl"
    if not path.exists():
        errs = sorted(tmp.glob(f"{kind}.*.err")) or sorted(tmp.glob("spawn.err"))
        pytest.fail(f"{kind} did not finish:\n" + "\n".join(e.read_text() for e in errs))
    with open(path, "rb") as f:
        df, placements = pickle.load(f)
    assert placements[0] == "(Shard(dim=0),)"  # transformers sharded the up projection's columns
    ref = reference[kind]
    assert len(df) == len(ref) == 2 * 2  # 2 layers × (pre, post), bucket all
    for a, b in zip(df.itertuples(), ref.itertuples()):
        assert (a.layer, a.site, a.bucket, a.n_samples, a.dim) == (b.layer, b.site, b.bucket, b.n_samples, b.dim)
        assert a.dim == 24  # the whole FFN, Phi-3's gate half of its fused gate_up
        np.testing.assert_allclose([a.soft_rank, a.hard_rank], [b.soft_rank, b.hard_rank], rtol=1e-9)
        np.testing.assert_allclose(
            np.sort(a.eigenvalues), np.sort(b.eigenvalues), rtol=0, atol=1e-9 * max(b.eigenvalues)
        )
