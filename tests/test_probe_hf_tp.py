"""transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")``, DTensor weights) on
two gloo ranks: every row equals the unsharded model's.

Mixtral's plan shards attention and leaves the experts whole on every rank: no site is a
shard, and the rows both ranks see count once (before, twice).

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

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_results import assert_rows_equal, result

import capscale

T = pytest.importorskip("transformers")

FAMILIES = ("phi3", "llama", "mixtral")
# float64 throughout where the model runs in it (only round-off differs); Mixtral's grouped GEMM
# takes float32 only, so its ranks agree to float32 round-off.
DTYPE = {"phi3": torch.float64, "llama": torch.float64, "mixtral": torch.float32}


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
    if kind == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2))
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
                model = T.AutoModelForCausalLM.from_pretrained(f"{tmp}/{kind}", tp_plan="auto", dtype=DTYPE[kind])
                layer = model.model.layers[0]
                up = getattr(layer.mlp, "gate_up_proj", None) or getattr(layer.mlp, "gate_proj", None)
                kinds = [
                    str(getattr(getattr(m, "weight", None), "placements", "local"))
                    for m in (up, getattr(layer.self_attn, "q_proj", layer.self_attn.o_proj))
                ]
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
        reference[kind] = _rows(model.to(DTYPE[kind]).eval())
    try:
        mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, join=True, start_method="fork")
    except Exception as exc:  # each test reports its own family's error
        (tmp / "spawn.err").write_text(str(exc))
    return tmp, reference


@pytest.mark.parametrize("kind", FAMILIES)
def test_transformers_tensor_parallel_rows_equal_the_unsharded_model(runs, kind):
    tmp, reference = runs
    df, placements = result(tmp, kind)
    # transformers sharded the columns: the FFN's up projection (Phi-3, Llama), attention's (Mixtral,
    # whose experts stay whole on every rank: their rows, the same on both ranks, count once)
    assert placements[0 if kind != "mixtral" else 1] == "(Shard(dim=0),)"
    ref = reference[kind]
    assert len(df) == len(ref) == 2 * 2  # 2 layers × (pre, post), bucket all
    assert set(df.dim) == {24}  # the whole FFN, Phi-3's gate half of its fused gate_up
    assert_rows_equal(df, ref, 1e-9 if DTYPE[kind] == torch.float64 else 1e-5)
