"""The paper's GPT: config validation, shapes, causality, the probe's module-name
contract, init, parameter roles, RoPE and QK-norm properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from capscale.train.model import ACTIVATIONS, GPT, POSITIONS, GPTConfig, Rotary

V, S, D = 64, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=V, seq_len=S, n_layer=2, n_head=4, d_model=D)
    return GPTConfig(**{**base, **kw})


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model with every weight random (zero-init blocks are the identity, which
    would make causality and QK-norm checks vacuous)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# ----------------------------------------------------------------------------- config


def test_ffn_width_resolution():
    assert tiny().ffn_dim == 4 * D
    assert tiny(ffn_mult=2).ffn_dim == 2 * D
    assert tiny(ffn_mult=1.5).ffn_dim == 48
    assert tiny(ffn_mult=1 / 32).ffn_dim == 1
    assert tiny(ffn_width=50).ffn_dim == 50
    assert GPT(tiny(ffn_width=50)).blocks[0].mlp.c_fc.out_features == 50


@settings(max_examples=60, deadline=None)
@given(d_model=st.integers(1, 512), mult=st.floats(0.0, 20.0, allow_nan=False))
def test_ffn_mult_property(d_model, mult):
    """Any multiplier either resolves to round(mult·d_model) ≥ 1 or is refused."""
    width = round(mult * d_model)
    if width < 1:
        with pytest.raises(ValueError, match="FFN width must be ≥ 1"):
            GPTConfig(d_model=d_model, n_head=1, pos="none", ffn_mult=mult)
    else:
        assert GPTConfig(d_model=d_model, n_head=1, pos="none", ffn_mult=mult).ffn_dim == width


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=30, n_head=4), "divisible by n_head"),
        (dict(d_model=12, n_head=4), "even head dim"),  # head_dim 3 with RoPE
        (dict(activation="tanh"), "activation must be one of"),
        (dict(pos="alibi"), "pos must be one of"),
        (dict(ffn_width=0), "FFN width must be ≥ 1"),
        (dict(ffn_width=-3), "FFN width must be ≥ 1"),
        (dict(ffn_mult=0.01), "FFN width must be ≥ 1"),
        (dict(ffn_width=64, ffn_mult=2), "not both"),
        (dict(ffn_width=64.0), "ffn_width must be an int"),
        (dict(ffn_mult=float("inf")), "ffn_mult must be finite"),
        (dict(ffn_mult="4"), "ffn_mult must be a number"),
        (dict(n_layer=0), "n_layer must be ≥ 1"),
        (dict(vocab_size=64.0), "vocab_size must be an int"),
        (dict(d_model=True), "d_model must be an int"),
        (dict(qk_norm="yes"), "qk_norm must be a bool"),
        (dict(rope_base=1.0), "rope_base"),
    ],
)
def test_config_rejects_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = tiny(ffn_mult=3, activation="swiglu")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown GPTConfig key\(s\) \['ffn_multiplier'\]"):
        GPTConfig.from_dict({"ffn_multiplier": 2})


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_losses():
    model = randomized(tiny())
    idx = torch.randint(0, V, (3, S))
    tgt = torch.randint(0, V, (3, S))
    logits = model(idx)
    assert logits.shape == (3, S, V)
    logits2, loss = model(idx, tgt)
    assert torch.equal(logits, logits2) and loss.shape == () and loss.dtype == torch.float32
    _, per_tok = model(idx, tgt, reduction="none")
    assert per_tok.shape == (3, S)
    # independent reference: log-softmax in float64
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, tgt[..., None])[..., 0]
    torch.testing.assert_close(per_tok.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref.mean(), rtol=1e-5, atol=1e-5)
    # ignored targets (-1) get zero loss and leave the mean
    tgt_masked = tgt.clone()
    tgt_masked[:, :5] = -1
    _, per_masked = model(idx, tgt_masked, reduction="none")
    _, mean_masked = model(idx, tgt_masked)
    assert torch.all(per_masked[:, :5] == 0)
    torch.testing.assert_close(mean_masked.double(), ref[:, 5:].mean(), rtol=1e-5, atol=1e-5)


def test_initial_loss_is_uniform():
    # zero-init residual outputs + small head: the untrained model predicts ~uniformly
    torch.manual_seed(0)
    idx = torch.randint(0, V, (4, S))
    _, loss = GPT(tiny())(idx, idx)
    assert abs(loss.item() - math.log(V)) < 0.05


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_causal(pos, activation):
    model = randomized(tiny(pos=pos, activation=activation))
    idx = torch.randint(0, V, (2, S))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-3


def test_forward_rejects_bad_input():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        model(torch.zeros(1, S + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(S, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        model(torch.zeros(1, S, dtype=torch.long), torch.zeros(1, S, dtype=torch.long), reduction="sum")
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, S, dtype=torch.long), torch.zeros(1, S - 1, dtype=torch.long))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"d_model": 32})


# ----------------------------------------------------------------------------- the probe's contract


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ffn_sites_by_name(activation):
    cfg = tiny(activation=activation, ffn_width=40)
    model = randomized(cfg)
    modules = dict(model.named_modules())
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == cfg.n_layer
    seen: dict[str, torch.Tensor] = {}

    def keep(name, output=True):
        def hook(_mod, inputs, out):
            seen[name] = (out if output else inputs[0]).detach()

        return hook

    for i in range(cfg.n_layer):
        c_fc, c_proj = modules[f"blocks.{i}.mlp.c_fc"], modules[f"blocks.{i}.mlp.c_proj"]
        assert isinstance(c_fc, nn.Linear) and (c_fc.in_features, c_fc.out_features) == (D, 40)
        assert isinstance(c_proj, nn.Linear) and (c_proj.in_features, c_proj.out_features) == (40, D)
        assert f"blocks.{i}.attn" in modules
        c_fc.register_forward_hook(keep(f"pre{i}"))
        c_proj.register_forward_hook(keep(f"post{i}", output=False))
        if activation == "swiglu":
            c_up = modules[f"blocks.{i}.mlp.c_up"]
            assert isinstance(c_up, nn.Linear) and c_up.out_features == 40
            c_up.register_forward_hook(keep(f"up{i}"))
        else:
            assert f"blocks.{i}.mlp.c_up" not in modules
    model(torch.randint(0, V, (2, S)))
    for i in range(cfg.n_layer):
        pre, post = seen[f"pre{i}"], seen[f"post{i}"]
        assert pre.shape == post.shape == (2, S, 40)
        if activation == "relu2":
            expected = F.relu(pre).square()
        elif activation == "gelu":
            expected = F.gelu(pre)
        else:
            expected = F.silu(pre) * seen[f"up{i}"]
        torch.testing.assert_close(post, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- init and parameters


def test_init_no_biases_no_norm_weights_untied_head():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, seq_len=S, n_layer=2, n_head=4, d_model=64, pos="learned"))
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            assert mod.bias is None
    # every parameter is a Linear or Embedding weight: the RMSNorms are parameter-free
    owners = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}
    mods = dict(model.named_modules())
    assert all(isinstance(mods[o], (nn.Linear, nn.Embedding)) for o in owners)
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    for block in model.blocks:
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.002
        assert abs(block.attn.c_q.weight.std().item() - 0.02) < 0.003
    for w in (model.tok_emb.weight, model.pos_emb.weight, model.lm_head.weight):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pos", POSITIONS)
def test_param_roles_and_count(activation, pos):
    cfg = tiny(activation=activation, pos=pos, ffn_width=40)
    model = GPT(cfg)
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    n_mats = 4 + (3 if activation == "swiglu" else 2)  # q, k, v, o + FFN matrices
    assert len(groups["matrix"]) == cfg.n_layer * n_mats
    assert all(p.dim() == 2 for p in groups["matrix"])
    assert groups["head"] == [model.lm_head.weight]
    assert len(groups["embed"]) == (2 if pos == "learned" else 1)
    ffn = (3 if activation == "swiglu" else 2) * D * 40
    embed = V * D + (S * D if pos == "learned" else 0)
    assert model.num_params() == embed + cfg.n_layer * (4 * D * D + ffn) + V * D
    assert model.num_params(non_embedding=True) == model.num_params() - embed


# ----------------------------------------------------------------------------- RoPE and QK norm


def test_rope_scores_depend_only_on_offset():
    torch.manual_seed(0)
    hd, n = 8, 12
    rot = Rotary(hd, n, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)
    rq = rot(q.expand(1, 1, n, hd))[0, 0]
    rk = rot(k.expand(1, 1, n, hd))[0, 0]
    scores = rq @ rk.T  # scores[i, j] = <q at i, k at j>
    for shift in (1, 3):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(n))  # a rotation
    assert not torch.allclose(scores[0, 1], scores[0, 2])  # but position does matter


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_scale_free(qk_norm):
    model = randomized(tiny(qk_norm=qk_norm))
    idx = torch.randint(0, V, (2, S))
    before = model(idx)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_q.weight.mul_(5.0)
            block.attn.c_k.weight.mul_(0.3)
    after = model(idx)
    same = torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert same == qk_norm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast is a CUDA path")
def test_bf16_autocast_on_cuda_keeps_fp32_loss():
    model = GPT(tiny()).cuda()
    idx = torch.randint(0, V, (2, S), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
