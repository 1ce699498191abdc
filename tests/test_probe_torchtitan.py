"""torchtitan's Llama3 debug model (unsharded, CPU, flex attention): found by structure, measured exactly.

torchtitan keeps its blocks in an ``nn.ModuleDict`` keyed by the global layer
index (a pipeline stage deletes the layers it does not hold) and its FFN as
``feed_forward.{w1, w2, w3}``: SwiGLU, ``w1`` the gate. Every layer's ``pre``
(w1's output) and ``post`` (w2's input) is checked against this test's own
hooks and eigenvalues in float64. Runs where torchtitan is installed
(``scripts/setup.sh --test`` installs it).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
llama3 = pytest.importorskip("torchtitan.models.llama3")

from capscale.probe import attach, discover, discover_sites  # noqa: E402


@pytest.fixture(scope="module")
def titan():
    torch.manual_seed(0)
    model = llama3.model_registry("debugmodel", attn_backend="flex").model.build()
    model.init_states()
    return model.eval()


def _forward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, model.get_attention_masks(positions))


def test_torchtitan_llama3_sites(titan):
    sites = discover_sites(titan)
    keys = list(titan.layers.keys())
    assert len(keys) == 6
    want = {(int(k), s, f"layers.{k}.feed_forward.{m}") for k in keys for s, m in (("pre", "w1"), ("post", "w2"))}
    assert {(s.layer, s.site, s.name) for s in sites} == want
    assert all(s.stack == "" for s in sites)
    assert {s.capture for s in sites if s.site == "pre"} == {"output"}
    assert {s.capture for s in sites if s.site == "post"} == {"input"}


def test_pipeline_stage_keeps_global_layer_index(titan):
    stage = copy.deepcopy(titan)
    for k in ("0", "1", "4", "5"):  # what torchtitan's pipeline split leaves on a middle stage
        del stage.layers[k]
    sites = discover_sites(stage)
    assert sorted({s.layer for s in sites}) == [2, 3]
    assert {s.name for s in sites if s.layer == 3} == {"layers.3.feed_forward.w1", "layers.3.feed_forward.w2"}


def _ranks(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 1e-12, None)[::-1]
    p = lam / lam.sum()
    return lam, float(np.exp(-(p * np.log(p)).sum())), float(lam.sum() ** 2 / (lam**2).sum())


def test_torchtitan_llama3_measured_exactly(titan, one_thread):
    own: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for k, block in titan.layers.items():
        ff = block.feed_forward
        handles.append(ff.w1.register_forward_hook(lambda m, a, o, k=int(k): own.setdefault((k, "pre"), []).append(o)))
        handles.append(
            ff.w2.register_forward_pre_hook(lambda m, a, k=int(k): own.setdefault((k, "post"), []).append(a[0]))
        )
    probe = attach(titan, every=1, dtype=torch.float64, mode="any")
    _forward(titan)
    df = probe.compute()
    probe.close()
    for h in handles:
        h.remove()
    assert len(own) == 12
    for (layer, site), xs in own.items():
        x = torch.cat(xs).double().reshape(-1, xs[0].shape[-1]).numpy()
        row = df[(df.layer == layer) & (df.site == site) & (df.bucket == "all")]
        assert len(row) == 1, (layer, site)
        row = row.iloc[0]
        assert row.n_samples == 48 and row.dim == x.shape[1] == 256 * 3
        lam, soft, hard = _ranks(x)
        np.testing.assert_allclose([row.soft_rank, row.hard_rank], [soft, hard], rtol=1e-9)
        np.testing.assert_allclose(sorted(row.eigenvalues, reverse=True)[:40], lam[:40], rtol=1e-9)


def test_torchtitan_qwen3_and_deepseek_v3_sites():
    """Qwen3: every layer's w1/w2. DeepSeek-V3: the dense layer, the shared experts, and the routed
    experts (``RoutedExperts``: ``w1_EFD`` … of ``GroupedExperts``, fed tokens sorted by expert),
    recomputed per expert from the routing (their own stack, beside the shared expert's)."""
    qwen3 = pytest.importorskip("torchtitan.models.qwen3")
    deepseek = pytest.importorskip("torchtitan.models.deepseek_v3")
    torch.manual_seed(0)
    model = qwen3.model_registry("debugmodel", attn_backend="flex").model.build()
    sites = discover_sites(model)
    assert {(s.layer, s.name) for s in sites if s.site == "pre"} == {
        (int(k), f"layers.{k}.feed_forward.w1") for k in model.layers
    }
    model = deepseek.model_registry("debugmodel", attn_backend="flex").model.build()
    found = discover(model)
    dense = [k for k, b in model.layers.items() if getattr(b, "moe", None) is None]
    moe = [k for k in model.layers if k not in dense]
    assert dense and moe
    got = {(s.stack, s.layer, s.site, s.name) for s in found.sites}
    assert {(st, la, n) for st, la, si, n in got if si == "pre"} == (
        {("", int(k), f"layers.{k}.feed_forward.w1") for k in dense}
        | {("shared-expert", int(k), f"layers.{k}.moe.shared_experts.w1") for k in moe}
        | {("", int(k), f"layers.{k}.moe.routed_experts") for k in moe}
    )
    assert not found.skipped


def _two_layer_deepseek():
    import dataclasses

    deepseek = pytest.importorskip("torchtitan.models.deepseek_v3")
    config = deepseek.model_registry("debugmodel", attn_backend="flex").model
    torch.manual_seed(0)
    model = dataclasses.replace(config, layers=config.layers[:2]).build()  # a dense layer, an MoE layer
    model.init_states()
    return model.eval()


def test_torchtitan_routed_experts_measured_as_grouped_experts_computes_them(one_thread):
    """DeepSeek-V3's routed experts, per token bucket: the rows are GroupedExperts' own (its
    grouped GEMM in bfloat16, SiLU), one per (token, chosen expert), each under its token's
    bucket (the dispatcher's sort, undone); checked against hooks on GroupedExperts itself."""
    from capscale.spectrum import BUCKETS, FrequencyTable

    model = _two_layer_deepseek()
    moe = model.layers["1"].moe
    inner, k = moe.routed_experts.inner_experts, moe.router.top_k
    vocab = model.config.vocab_size
    freq = FrequencyTable((vocab - np.arange(vocab)) ** 3)  # HEAD ids 0-194, MID 195-494, TAIL the rest
    seen: dict = {}
    hooks = [
        moe.router.register_forward_hook(lambda m, a, o: seen.__setitem__("ids", o[1])),
        inner.register_forward_hook(lambda m, a, o: seen.__setitem__("routed", a)),
    ]
    probe = attach(model, every=1, dtype=torch.float64, mode="any", freq_table=freq, sites=("pre", "post"))
    g = torch.Generator().manual_seed(3)
    tokens = torch.cat(
        [torch.randint(0, 495, (2, 12), generator=g), torch.randint(495, vocab, (2, 12), generator=g)], 1
    )
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        model(tokens, positions, model.get_attention_masks(positions))
    df = probe.compute()
    probe.close()
    for h in hooks:
        h.remove()
    x, per_expert = seen["routed"]
    offs = torch.cumsum(per_expert, 0, dtype=torch.int32)
    with torch.no_grad():
        gate = inner._grouped_mm(A=x.bfloat16(), B_t=inner.w1_EFD.bfloat16().transpose(-2, -1), offs=offs)
        up = inner._grouped_mm(A=x.bfloat16(), B_t=inner.w3_EFD.bfloat16().transpose(-2, -1), offs=offs)
    token = torch.argsort(seen["ids"].reshape(-1), stable=True) // k  # the dispatcher's order
    bucket = np.asarray(BUCKETS)[freq.bucket(tokens.reshape(-1)[token].numpy())]
    assert set(bucket) == set(BUCKETS)
    for site, rows in (("pre", gate), ("post", torch.nn.functional.silu(gate) * up)):
        rows = rows.double().numpy()
        for b in ("all", *BUCKETS):
            sel = rows if b == "all" else rows[bucket == b]
            got = df[(df.layer == 1) & (df["stack"] == "") & (df.site == site) & (df.bucket == b)]
            assert len(got) == 1, (site, b)
            got = got.iloc[0]
            assert got.n_samples == len(sel) and (b != "all" or len(sel) == tokens.numel() * k)
            lam, soft, hard = _ranks(sel)
            np.testing.assert_allclose([got.soft_rank, got.hard_rank], [soft, hard], rtol=1e-9)


def test_torchtitan_experts_split_over_ranks_named_unless_expert_parallel_alone():
    """Expert tensor parallelism (a mesh dimension splitting ``w1_EFD``'s hidden axis), or expert
    parallelism whose dispatcher has no mesh wired, is named by discovery with the reason; expert
    parallelism alone through the all-to-all dispatcher is measured
    (tests/test_probe_torchtitan_ep.py); FSDP's own shards (``efsdp``) are no reason."""
    from capscale.probe.sites import titan_ep, titan_split

    model = _two_layer_deepseek()
    routed = model.layers["1"].moe.routed_experts
    mesh = type("Mesh", (), {"mesh_dim_names": ("efsdp", "ep"), "ndim": 2})()
    shard = type("Shard", (), {})
    experts, hidden, rep = shard(), shard(), type("Replicate", (), {})()
    experts.dim, hidden.dim = 0, 1
    weight = routed.inner_experts.w1_EFD
    weight.device_mesh, weight.placements = mesh, (rep, experts)
    assert routed.token_dispatcher.ep_mesh is None  # not wired: no exchange to follow
    assert titan_split(routed) == "ep" and titan_ep(routed) is None
    found = discover(model)
    assert [(sk.layer, sk.name) for sk in found.skipped] == [(1, "layers.1.moe.routed_experts")]
    assert "mesh dimension ep" in found.skipped[0].reason
    assert not any(s.name.startswith("layers.1.moe.routed_experts") for s in found.sites)
    routed.token_dispatcher.ep_mesh = mesh  # wired: expert parallelism alone is measured
    assert titan_ep(routed) is mesh and titan_split(routed) is None
    assert not discover(model).skipped
    weight.placements = (rep, hidden)  # expert tensor parallelism: part of every expert
    assert titan_split(routed) == "ep" and titan_ep(routed) is None
    weight.placements = (experts, rep)  # FSDP over efsdp only: whole in the forward
    assert titan_split(routed) is None and titan_ep(routed) is None


def test_expert_parallel_experts_in_a_tensor_parallel_model_are_left_out_with_the_reason(monkeypatch):
    """Where the model is also tensor parallel, expert-parallel experts are not measured (whether the
    group's ranks route the same tokens is not known); every other site is kept."""
    from types import SimpleNamespace

    from capscale.probe import tensor_parallel
    from capscale.probe.probe import Probe

    model = _two_layer_deepseek()
    routed = model.layers["1"].moe.routed_experts
    mesh = type("Mesh", (), {"mesh_dim_names": ("ep",), "ndim": 1})()
    shard = type("Shard", (), {"dim": 0})()
    routed.inner_experts.w1_EFD.device_mesh, routed.inner_experts.w1_EFD.placements = mesh, (shard,)
    routed.token_dispatcher.ep_mesh = mesh
    sites = discover(model).sites
    ep = [s for s in sites if s.name == "layers.1.moe.routed_experts"]
    assert len(ep) == 2  # pre and post
    owner = SimpleNamespace(skipped=[])
    monkeypatch.setattr(tensor_parallel, "model_group", lambda model, tp_group=None: None)
    assert Probe._without_ep_under_tp(owner, sites, model, None) == sites and not owner.skipped
    monkeypatch.setattr(tensor_parallel, "model_group", lambda model, tp_group=None: "tp")
    kept = Probe._without_ep_under_tp(owner, sites, model, None)
    assert kept == [s for s in sites if s not in ep]
    assert [(sk.layer, sk.name) for sk in owner.skipped] == [(1, "layers.1.moe.routed_experts")]
    assert "tensor-parallel model" in owner.skipped[0].reason
