"""Site discovery: known architectures by name, explicit patterns or modules, clear errors.

Also home of the tiny model builders the other probe tests import.
"""

import warnings

import pytest
import torch
from torch import nn

from capscale.probe import SiteDiscoveryError, SiteSpec, discover_sites


class MLP(nn.Module):
    def __init__(self, d, h, act="relu2"):
        super().__init__()
        self.c_fc = nn.Linear(d, h)
        self.c_proj = nn.Linear(h, d)
        self.act = act

    def forward(self, x):
        h = self.c_fc(x)
        h = torch.relu(h).square() if self.act == "relu2" else torch.nn.functional.gelu(h)
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = MLP(d, h)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class ToyLM(nn.Module):
    """Names its FFN sites like capscale's GPT (``blocks.{i}.mlp.c_fc`` / ``c_proj``)."""

    def __init__(self, vocab=50, d=8, h=12, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, targets=None):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(x)
        if targets is None:
            return logits
        return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def toy(seed=0, **kw):
    torch.manual_seed(seed)
    return ToyLM(**kw)


def hf_gpt2(vocab=64, layers=2, d=16, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=d,
        n_layer=layers,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def hf_llama(vocab=64, layers=2, d=16, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def our_gpt(vocab=64, layers=2, d=16, seed=0, **kw):
    model = pytest.importorskip("capscale.train.model", reason="capscale.train.model not importable yet")
    torch.manual_seed(seed)
    return model.GPT(model.GPTConfig(vocab_size=vocab, seq_len=32, n_layer=layers, n_head=2, d_model=d, **kw))


def tl_model(vocab=64, layers=2, d=16, seed=0):
    tl = pytest.importorskip("transformer_lens")
    try:
        HT, HTC = tl.HookedTransformer, tl.HookedTransformerConfig
    except (ImportError, AttributeError):
        pytest.skip("transformer_lens >= 4 has no HookedTransformer (blocks.{i}.mlp.hook_pre)")
    cfg = HTC(
        n_layers=layers,
        d_model=d,
        n_ctx=32,
        d_head=8,
        n_heads=2,
        d_mlp=40,
        d_vocab=vocab,
        act_fn="gelu",
        device="cpu",
        seed=seed,
    )
    with warnings.catch_warnings():  # 3.x deprecates HookedTransformer in favour of 4.x's bridge
        warnings.simplefilter("ignore", DeprecationWarning)
        return HT(cfg)


def _names(sites):
    return [(s.layer, s.site, s.name, s.capture) for s in sites]


def test_toy_follows_our_gpt_naming():
    sites = discover_sites(toy(layers=3))
    assert _names(sites) == [
        (i, s, f"blocks.{i}.mlp.{m}", c)
        for i in range(3)
        for s, m, c in (("pre", "c_fc", "output"), ("post", "c_proj", "input"))
    ]
    assert sites[0].feature_dim() == 12 and sites[1].feature_dim() == 12


def test_our_gpt():
    sites = discover_sites(our_gpt(layers=2, activation="swiglu"))
    # SwiGLU: pre = the gate projection c_fc (not c_up), post = the input of c_proj
    assert _names(sites)[:2] == [
        (0, "pre", "blocks.0.mlp.c_fc", "output"),
        (0, "post", "blocks.0.mlp.c_proj", "input"),
    ]


def test_hf_gpt2_conv1d():
    sites = discover_sites(hf_gpt2())
    assert _names(sites)[:2] == [
        (0, "pre", "transformer.h.0.mlp.c_fc", "output"),
        (0, "post", "transformer.h.0.mlp.c_proj", "input"),
    ]
    assert [s.feature_dim() for s in sites[:2]] == [64, 64]  # Conv1D: 4 x n_embd


def test_hf_llama_gated():
    sites = discover_sites(hf_llama())
    assert _names(sites)[:2] == [
        (0, "pre", "model.layers.0.mlp.gate_proj", "output"),
        (0, "post", "model.layers.0.mlp.down_proj", "input"),
    ]


def test_transformer_lens_hook_points():
    sites = discover_sites(tl_model())
    assert _names(sites)[:2] == [
        (0, "pre", "blocks.0.mlp.hook_pre", "output"),
        (0, "post", "blocks.0.mlp.hook_post", "output"),
    ]


def test_wrapper_prefixes_and_layer_selection():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = toy(layers=4)

    sites = discover_sites(Wrapper(), sites=("post",), layers=[1, -1])
    assert _names(sites) == [
        (1, "post", "module.blocks.1.mlp.c_proj", "input"),
        (3, "post", "module.blocks.3.mlp.c_proj", "input"),
    ]
    with pytest.raises(SiteDiscoveryError, match=r"layer 7 not found; the model has layers \[0, 1, 2, 3\]"):
        discover_sites(Wrapper(), layers=[7])


def test_explicit_patterns_modules_and_specs():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList(
                nn.ModuleDict({"up": nn.Linear(4, 6), "down": nn.Linear(6, 4)}) for _ in range(2)
            )

    m = Odd()
    by_pattern = discover_sites(m, sites={"pre": "stack.{layer}.up", "post": ("stack.{layer}.down", "input")})
    assert _names(by_pattern) == [
        (0, "pre", "stack.0.up", "output"),
        (0, "post", "stack.0.down", "input"),
        (1, "pre", "stack.1.up", "output"),
        (1, "post", "stack.1.down", "input"),
    ]
    downs = SiteSpec({1: m.stack[1]["down"], 0: m.stack[0]["down"]}, "output")
    by_modules = discover_sites(m, sites={"pre": [b["up"] for b in m.stack], "post": downs}, layers=[1])
    assert _names(by_modules) == [(1, "pre", "stack.1.up", "output"), (1, "post", "stack.1.down", "output")]
    with pytest.raises(SiteDiscoveryError, match=r"site 'post' not found for layers \[1\]"):
        discover_sites(
            m, sites={"pre": [b["up"] for b in m.stack], "post": SiteSpec({0: m.stack[0]["down"]}, "output")}
        )


def test_unknown_architecture_error_lists_what_was_looked_for():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(SiteDiscoveryError) as err:
        discover_sites(model)
    msg = str(err.value)
    for needle in ("Sequential", "no stack of repeated blocks", "{layer}", "SiteSpec", "--site pre="):
        assert needle in msg


def test_bad_specs():
    m = toy()
    with pytest.raises(ValueError, match="exactly once"):
        discover_sites(m, sites={"pre": "blocks.mlp.c_fc"})
    with pytest.raises(SiteDiscoveryError, match="matched no module"):
        discover_sites(m, sites={"pre": "blocks.{layer}.ffn"})
    with pytest.raises(SiteDiscoveryError, match="not a submodule"):
        discover_sites(m, sites={"pre": [nn.Linear(2, 2)]})
    with pytest.raises(ValueError, match="unknown site"):
        discover_sites(m, sites=("middle",))
    with pytest.raises(ValueError, match="capture"):
        SiteSpec("x.{layer}", "weights")


def test_two_stacks_are_two_stacks():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = toy(layers=2), toy(layers=3)

    sites = discover_sites(Two())
    assert [(s.stack, s.layer, s.site, s.name) for s in sites if s.site == "pre"] == [
        ("encoder", 0, "pre", "encoder.blocks.0.mlp.c_fc"),
        ("encoder", 1, "pre", "encoder.blocks.1.mlp.c_fc"),
        ("decoder", 0, "pre", "decoder.blocks.0.mlp.c_fc"),
        ("decoder", 1, "pre", "decoder.blocks.1.mlp.c_fc"),
        ("decoder", 2, "pre", "decoder.blocks.2.mlp.c_fc"),
    ]
    # an explicit pattern that matches in both stacks is still ambiguous
    with pytest.raises(SiteDiscoveryError, match="ambiguous"):
        discover_sites(Two(), sites={"pre": "blocks.{layer}.mlp.c_fc"})


# -- never silent ----------------------------------------------------------------


def test_naming_a_container_is_refused():
    with pytest.raises(SiteDiscoveryError, match=r"blocks\.0\.mlp \(MLP\) is a container.*residual stream"):
        discover_sites(toy(), sites={"pre": "blocks.{layer}.mlp"})
    with pytest.raises(SiteDiscoveryError, match="container"):
        discover_sites(toy(), sites={"post": ("blocks.{layer}", "input")})


def test_a_site_that_never_runs_is_not_run_and_said():
    """BLOOM with slow_but_exact calls dense_4h_to_h's weight through F.linear: the module never runs."""
    transformers = pytest.importorskip("transformers")
    import capscale

    torch.manual_seed(0)
    cfg = transformers.BloomConfig(
        vocab_size=64, hidden_size=16, n_layer=2, n_head=2, pretraining_tp=2, slow_but_exact=True
    )
    model = transformers.BloomForCausalLM(cfg)
    probe = capscale.attach(model, every=1, mode="any")
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 8)))
    with pytest.warns(UserWarning, match=r"captured nothing.*layer 0 site 'post'.*layer 1 site 'post'"):
        df = probe.compute()
    post, pre = df[df.site == "post"], df[df.site == "pre"]
    assert list(post.layer) == [0, 1] and set(post.sampling_status) == {"not-run"}
    assert set(post.n_samples) == {0} and set(post.dim) == {64}
    assert set(pre.sampling_status) != {"not-run"} and set(pre.n_samples) == {16}


def test_a_site_of_unknown_width_that_never_runs_gets_a_row():
    class Act(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    class MLP2(MLP):
        def __init__(self, d, h):
            super().__init__(d, h)
            self.spare = Act()  # never called: its width is unknown

    m = toy()
    for b in m.blocks:
        b.mlp = MLP2(8, 12)
    import capscale

    probe = capscale.attach(m, sites={"pre": "blocks.{layer}.mlp.spare", "post": "blocks.{layer}.mlp.c_proj"})
    probe.step(0)
    with torch.no_grad():
        m(torch.randint(0, 50, (2, 5)))
    with pytest.warns(UserWarning, match="captured nothing"):
        df = probe.compute()
    pre = df[df.site == "pre"]
    assert len(pre) == 2 and set(pre.sampling_status) == {"not-run"} and set(pre.dim) == {0}
    assert pre.soft_rank.isna().all()
    assert set(df[df.site == "post"].n_samples) == {10}


def test_unmeasurable_blocks_are_listed_in_a_warning_and_the_description():
    """A layer whose experts are 3-D weights of a layout capscale does not know: listed, with the reason."""
    import capscale

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8, 12))  # [E, H, I], used through einsum

        def forward(self, x):
            return torch.einsum("...h,ehi->...i", x, self.w).sum(-1, keepdim=True) * x

    class MoEBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.experts = Experts()

        def forward(self, x):
            return x + self.experts(self.norm(x))

    m = toy(layers=3)
    m.blocks[1] = MoEBlock()
    with pytest.warns(UserWarning, match=r"1 block\(s\).*not measured: layer 1 \(blocks\.1\.experts\).*unknown layout"):
        probe = capscale.attach(m)
    assert sorted({s.layer for s in probe.sites}) == [0, 2]
    text = probe.description
    assert "not measured" in text and "blocks.1.experts" in text and "not reachable" in text
    with pytest.raises(SiteDiscoveryError, match="none of the chosen layers"):
        discover_sites(m, layers=[1])


def test_expert_modules_are_pooled_over_the_tokens_each_saw():
    """Switch Transformers: expert modules; rows map back to their tokens, so buckets and masks apply."""
    transformers = pytest.importorskip("transformers")
    import numpy as np

    import capscale
    from capscale.spectrum import FrequencyTable

    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        num_experts=4,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=0,
    )
    model = transformers.SwitchTransformersEncoderModel(cfg).eval()
    table = FrequencyTable(np.arange(64, 0, -1))
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    probe = capscale.attach(model, every=1, mode="any", freq_table=table, dtype=torch.float64)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    df = probe.compute()
    moe = df[(df.layer == 1) & (df.site == "pre")].set_index("bucket")
    # every kept token went to one expert (top-1): counts per bucket are the tokens' own
    kept = ids[mask.bool()]
    per_bucket = torch.bincount(table.bucket(kept).long(), minlength=3).tolist()
    assert moe.loc["all", "n_samples"] == int(mask.sum())
    assert [moe.loc[b, "n_samples"] for b in ("head", "mid", "tail")] == per_bucket
    # without mask or buckets: the same spectrum as hooks on each expert's wi, pooled by hand (float64)
    got = []
    experts = model.encoder.block[1].layer[1].mlp.experts.values()
    hooks = [e.wi.register_forward_hook(lambda m, a, o: got.append(o)) for e in experts]
    probe = capscale.attach(model, every=1, mode="any", dtype=torch.float64)
    with torch.no_grad():
        model(input_ids=ids)
    df = probe.compute()
    for h in hooks:
        h.remove()
    x = torch.cat(got).double().numpy()
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 1e-12, None)
    row = df[(df.layer == 1) & (df.site == "pre")].iloc[0]
    assert row.n_samples == ids.numel() == len(x)
    np.testing.assert_allclose(row.hard_rank, lam.sum() ** 2 / (lam**2).sum(), rtol=1e-6)


def test_sitespec_is_top_level_and_import_stays_numpy_only():
    import subprocess
    import sys

    code = (
        "import sys, capscale; assert 'torch' not in sys.modules, 'import capscale loaded torch'; "
        "spec = capscale.SiteSpec('blocks.{layer}.mlp.c_fc', 'output'); "
        "from capscale.probe import SiteSpec; assert spec == SiteSpec('blocks.{layer}.mlp.c_fc', 'output'); "
        "assert 'SiteSpec' in capscale.__all__"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gate_found_by_a_traced_forward_when_names_do_not_say():
    """A gated FFN whose projections are called a and b: the one fed to the activation is the gate."""

    class Gated(nn.Module):
        def __init__(self, d=8, h=12):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

        def forward(self, x):
            return self.out(self.a(x) * nn.functional.silu(self.b(x)))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.ffn = Gated()

        def forward(self, x):
            return x + self.ffn(self.attn(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(2))

    sites = discover_sites(Net())
    assert _names(sites)[:2] == [(0, "pre", "layers.0.ffn.b", "output"), (0, "post", "layers.0.ffn.out", "input")]


@pytest.mark.parametrize("layout", ["first", "second", "interleaved"])
def test_fused_gate_up_is_captured_as_the_channels_that_feed_the_activation(layout):
    import numpy as np

    import capscale

    class Fused(nn.Module):
        def __init__(self, d=8, h=12):
            super().__init__()
            self.w_in, self.w_out = nn.Linear(d, 2 * h), nn.Linear(h, d)

        def forward(self, x):
            both = self.w_in(x)
            if layout == "interleaved":
                gate, up = both[..., ::2], both[..., 1::2]
            else:
                a, b = both.chunk(2, dim=-1)
                gate, up = (a, b) if layout == "first" else (b, a)
            return self.w_out(nn.functional.silu(gate) * up)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn_block = Fused()

        def forward(self, x):
            return x + self.ffn_block(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    net = Net()
    pre = discover_sites(net)[0]
    assert pre.name == "layers.0.ffn_block.w_in" and pre.feature_dim() == 12
    want = {"first": (0, 12, 1), "second": (12, 24, 1), "interleaved": (0, 24, 2)}[layout]
    assert pre.part == want
    gates = []
    gate_of = {"first": lambda t: t[..., :12], "second": lambda t: t[..., 12:], "interleaved": lambda t: t[..., ::2]}
    h = net.layers[0].ffn_block.w_in.register_forward_hook(lambda m, a, o: gates.append(gate_of[layout](o)))
    x = torch.randn(3, 20, 8)
    with capscale.attach(net, every=1, mode="any", dtype=torch.float64) as probe, torch.no_grad():
        net(x)
        df = probe.compute()
    h.remove()
    g = gates[0].double().reshape(-1, 12).numpy()
    lam = np.clip(np.linalg.eigvalsh(np.cov(g.T)), 1e-12, None)
    row = df[(df.layer == 0) & (df.site == "pre")].iloc[0]
    np.testing.assert_allclose(row.hard_rank, lam.sum() ** 2 / (lam**2).sum(), rtol=1e-6)


H_MOE, F_MOE, N_EXPERTS, TOP_K = 8, 12, 4, 2


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_fc1, self.linear_fc2 = nn.Linear(H_MOE, F_MOE), nn.Linear(F_MOE, H_MOE)

    def forward(self, x):
        return self.linear_fc2(torch.relu(self.linear_fc1(x)))


class _SequentialMLP(nn.Module):
    """Megatron's: fed the rows sorted by expert (each token top-k times) and the count per expert."""

    def __init__(self):
        super().__init__()
        self.local_experts = nn.ModuleList([_Expert() for _ in range(N_EXPERTS)])

    def forward(self, permuted, counts):
        return torch.cat([e(c) for e, c in zip(self.local_experts, permuted.split(counts.tolist()))])


def _dispatch(x, logits, experts):
    flat = x.reshape(-1, H_MOE)
    choice = logits.topk(TOP_K, dim=-1).indices.reshape(-1)
    order = torch.argsort(choice, stable=True)
    out = experts(flat[order // TOP_K], torch.bincount(choice, minlength=N_EXPERTS))
    back = torch.zeros(flat.shape[0] * TOP_K, H_MOE).index_copy(0, order, out)
    return back.view(-1, TOP_K, H_MOE).sum(1).view_as(x)


class _MoELayer(nn.Module):
    """Megatron's MoELayer: a router ([E, H] weight) beside the experts, fed the hidden states."""

    def __init__(self):
        super().__init__()
        self.router, self.experts = nn.Linear(H_MOE, N_EXPERTS, bias=False), _SequentialMLP()

    def forward(self, x):
        return _dispatch(x, self.router(x.reshape(-1, H_MOE)), self.experts)


class _BareExperts(nn.Module):
    """The same experts routed by a bare parameter (no router module): no layer holding a router
    is fed the hidden states, so discovery keeps the experts' own parent, fed permuted rows."""

    def __init__(self):
        super().__init__()
        self.route, self.experts = nn.Parameter(torch.randn(N_EXPERTS, H_MOE)), _SequentialMLP()

    def forward(self, x):
        return _dispatch(x, x.reshape(-1, H_MOE) @ self.route.T, self.experts)


class _MoENet(nn.Module):
    def __init__(self, bare: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, H_MOE)
        self.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.attention = nn.Linear(H_MOE, H_MOE)
            block.mlp = _BareExperts() if bare else _MoELayer()
            self.layers.append(block)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.layers:
            h = x + b.attention(x)
            x = h + b.mlp(h)
        return x


def _moe_table():
    import numpy as np

    from capscale.spectrum import FrequencyTable

    return FrequencyTable(np.arange(64, 0, -1))


def test_megatron_sequential_experts_are_mapped_to_their_tokens_through_the_router_s_layer():
    """Megatron's SequentialMLP is fed the rows sorted by expert, top-k times: its rows are not the
    tokens. Discovery hooks the layer that holds the router (fed the hidden states) instead, so each
    expert row maps back to its token: per-bucket rows equal a reference built from the routing."""
    import numpy as np

    import capscale
    from capscale.spectrum import BUCKETS

    model, table = _MoENet(), _moe_table()
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    seen: dict = {}
    hooks = []
    for k, block in enumerate(model.layers):
        for expert in block.mlp.experts.local_experts:
            hooks.append(expert.linear_fc1.register_forward_hook(lambda m, a, o, k=k: seen.setdefault(k, []).append(o)))
        hooks.append(block.mlp.register_forward_pre_hook(lambda m, a, k=k: seen.__setitem__(("x", k), a[0])))
        hooks.append(block.mlp.router.register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(("r", k), o)))
    probe = capscale.attach(model, every=1, mode="any", dtype=torch.float64, freq_table=table)
    assert {s.module for s in probe.sites} == {b.mlp for b in model.layers}  # the router's layer
    with torch.no_grad():
        model(ids)
    df = probe.compute()
    probe.close()
    for h in hooks:
        h.remove()
    for k in range(2):
        choice = seen["r", k].topk(TOP_K, dim=-1).indices.reshape(-1)
        token = torch.argsort(choice, stable=True) // TOP_K  # the rows' tokens, in the experts' order
        rows = torch.cat(seen[k]).double().numpy()
        bucket = np.asarray(BUCKETS)[table.bucket(ids.reshape(-1)[token].numpy())]
        for b in ("all", *BUCKETS):
            sel = rows if b == "all" else rows[bucket == b]
            got = df[(df.layer == k) & (df.site == "pre") & (df.bucket == b)]
            if len(sel) < 2:
                continue
            lam = np.clip(np.linalg.eigvalsh(np.cov(sel, rowvar=False)), 0, None)
            assert int(got.n_samples.iloc[0]) == len(sel), (k, b)
            np.testing.assert_allclose(got.hard_rank.iloc[0], lam.sum() ** 2 / (lam**2).sum(), rtol=1e-9)


def test_experts_fed_permuted_rows_without_a_router_layer_are_refused_with_buckets_measured_without():
    """No module beside a router is fed the hidden states: no expert row has a token. With a frequency
    table the probe refuses (naming why); without one it measures every routed row."""
    import capscale

    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    model = _MoENet(bare=True)
    probe = capscale.attach(model, every=1, mode="any", freq_table=_moe_table())
    with pytest.raises(ValueError, match="not fed the tokens.*dispatched or permuted"):
        with torch.no_grad():
            model(ids)
    probe.close(flush=False)
    probe = capscale.attach(model, every=1, mode="any", dtype=torch.float64)
    with torch.no_grad():
        model(ids)
    df = probe.compute()
    probe.close()
    assert set(df.bucket) == {"all"} and (df.n_samples == ids.numel() * TOP_K).all()  # every routed row


def test_experts_fed_rows_that_are_not_the_block_input_s_are_refused_with_the_reason():
    """Expert parallelism's all-to-all feeds a rank's experts other ranks' tokens (here: rows scaled
    after the block's input, which no input row equals): the probe says so at the first measured
    forward instead of giving rows to the wrong tokens."""
    import capscale

    model = _MoENet()
    for block in model.layers:
        real = block.mlp.experts.forward
        block.mlp.experts.forward = lambda permuted, counts, real=real: real(permuted * 2.0, counts)
    probe = capscale.attach(model, every=1, mode="any")
    with pytest.raises(ValueError, match="not rows of the MoE block's input.*expert parallelism"):
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 6)))
    probe.close(flush=False)
