"""torchtitan's routed experts under expert parallelism, on two gloo ranks: every row equals the
unsharded model's on both ranks' tokens.

Each rank holds half of DeepSeek-V3's routed experts (``w1_EFD`` … a DTensor sharded on the
expert axis over an ``ep`` mesh) and routes its own tokens; torchtitan's
``AllToAllTokenDispatcher`` sends each (token, chosen expert) row to the rank that holds the
expert. capscale measures a rank's experts on the rows it is sent, and each row's token
bucket follows the token through the same all-to-all. The dense layer and the shared expert
are data parallel. A second run biases the router so that no token reaches rank 1's experts:
that rank still joins the labels' all-to-all and adds nothing.
"""

from __future__ import annotations

import datetime
import pickle
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("triton")
pytest.importorskip("torchtitan.models.deepseek_v3")

from gloo_results import assert_rows_equal, result  # noqa: E402
from test_probe_torchtitan import _two_layer_deepseek  # noqa: E402

from capscale.probe import attach, discover  # noqa: E402
from capscale.spectrum import FrequencyTable  # noqa: E402

CASES = ("routed", "one-sided")


def _freq(vocab: int) -> FrequencyTable:
    return FrequencyTable((vocab - np.arange(vocab)) ** 3)  # HEAD ids 0-194, MID 195-494, TAIL the rest


def _tokens(vocab: int) -> torch.Tensor:
    """Four sequences: rank r routes rows 2r and 2r+1; every bucket is present."""
    g = torch.Generator().manual_seed(3)
    return torch.cat([torch.randint(0, 495, (4, 12), generator=g), torch.randint(495, vocab, (4, 12), generator=g)], 1)


def _model(case: str):
    model = _two_layer_deepseek()
    if case == "one-sided":  # experts 4-7 (rank 1's) are never chosen
        model.layers["1"].moe.expert_bias_E[4:] = -1e4
    return model


def _rows(model, *batches):
    """The rows of one window over ``batches``, each one forward (the reference runs each rank's
    batch as that rank does, so that the float32 forward rounds alike)."""
    probe = attach(model, every=1, dtype=torch.float64, mode="any", freq_table=_freq(model.config.vocab_size))
    for tokens in batches:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            model(tokens, positions, model.get_attention_masks(positions))
    df, skipped = probe.compute(), [str(s) for s in probe.skipped]
    probe.close()
    return df.sort_values(["stack", "layer", "site", "bucket"]).reset_index(drop=True), skipped


def _worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    try:
        from torchtitan.distributed.utils import set_spmd_backend

        # torchtitan's other backend: its "spmd_types" one exchanges uneven lists, which gloo refuses
        set_spmd_backend("partial_dtensor")
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        for case in CASES:
            try:
                model = _model(case)
                routed = model.layers["1"].moe.routed_experts
                inner = routed.inner_experts
                for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
                    w = getattr(inner, name)
                    setattr(inner, name, torch.nn.Parameter(distribute_tensor(w.data, mesh, [Shard(0)])))
                routed.token_dispatcher.wire_meshes(ep_mesh=mesh)
                local = tuple(inner.w1_EFD.to_local().shape)
                tokens = _tokens(model.config.vocab_size)[2 * rank : 2 * rank + 2]
                seen = []  # the rows this rank's experts are sent
                hook = inner.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].shape[0]))
                df, skipped = _rows(model, tokens)
                hook.remove()
                with open(f"{tmp}/{case}.rows.{rank}", "w") as f:
                    f.write(str(sum(seen)))
                if rank == 0:
                    with open(f"{tmp}/{case}.pkl", "wb") as f:
                        pickle.dump((df, skipped, local, [s.name for s in discover(model).sites]), f)
            except Exception:
                with open(f"{tmp}/{case}.{rank}.err", "w") as f:
                    f.write(traceback.format_exc())
                raise
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("titan_ep")
    reference, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the float32 forward then rounds alike
    try:
        for case in CASES:
            model = _model(case)
            tokens = _tokens(model.config.vocab_size)
            reference[case] = _rows(model, tokens[:2], tokens[2:])[0]
    finally:
        torch.set_num_threads(threads)
    try:
        mp.start_processes(_worker, args=(2, str(tmp)), nprocs=2, join=True, start_method="fork")
    except Exception as exc:  # each test reports its own case's error
        (tmp / "spawn.err").write_text(str(exc))
    return tmp, reference


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_rows_equal_the_unsharded_model(runs, case):
    tmp, reference = runs
    df, skipped, local, names = result(tmp, case)
    assert local == (4, 256, 256)  # half of the 8 experts on each rank
    sent = [int((tmp / f"{case}.rows.{r}").read_text()) for r in (0, 1)]
    assert sum(sent) == 4 * 24 * 3 and (sent[1] == 0) == (case == "one-sided")
    assert "layers.1.moe.routed_experts" in names and not skipped
    ref = reference[case]
    routed = ref[(ref.layer == 1) & (ref["stack"] == "")]
    assert set(routed.bucket) == {"all", "head", "mid", "tail"}
    # every (token, chosen expert) row once: 4 × 24 tokens × top-3
    assert int(routed[routed.bucket == "all"].n_samples.iloc[0]) == 4 * 24 * 3
    assert_rows_equal(df, ref, 1e-9)
