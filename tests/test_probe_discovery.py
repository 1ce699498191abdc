"""Discovery's layouts on small models of this test's own: ModuleDict stacks, nested stages, layers
shared across depth, several FFNs per block, channels-first convolutions, and refusals that say why.

Measured sites are checked against this test's own float64 covariance of the tensors it
captures itself (own hooks, own eigenvalues).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from capscale.probe import NoFFNError, SiteDiscoveryError, attach, discover, discover_sites


class FFN(nn.Module):
    def __init__(self, d=8, h=20):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self, d=8, h=20):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = FFN(d, h)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class DictLM(nn.Module):
    """Blocks in a ModuleDict keyed by global layer index (torchtitan); a pipeline stage drops some."""

    def __init__(self, keys=("0", "1", "2", "3")):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.layers = nn.ModuleDict({k: Block() for k in keys})

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.layers.values():
            x = b(x)
        return x


def _ids(seed=1, shape=(3, 10)):
    return torch.randint(0, 32, shape, generator=torch.Generator().manual_seed(seed))


def _ranks(x: np.ndarray) -> tuple[float, float]:
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 1e-12, None)
    p = lam / lam.sum()
    return float(np.exp(-(p * np.log(p)).sum())), float(lam.sum() ** 2 / (lam**2).sum())


def _check(df, own: dict[tuple[str, int, str], list[torch.Tensor]]):
    """Each of this test's own captures equals exactly one capscale row."""
    assert len(own) == len(df[df.bucket == "all"])
    for (stack, layer, site), xs in own.items():
        x = torch.cat([t.detach().double().reshape(-1, t.shape[-1]) for t in xs]).numpy()
        row = df[(df["stack"] == stack) & (df.layer == layer) & (df.site == site) & (df.bucket == "all")]
        assert len(row) == 1, (stack, layer, site)
        row = row.iloc[0]
        assert (row.n_samples, row.dim) == x.shape
        np.testing.assert_allclose([row.soft_rank, row.hard_rank], _ranks(x), rtol=1e-9)


def test_moduledict_stack_layer_from_key():
    sites = discover_sites(DictLM(("2", "3")))  # a middle pipeline stage
    assert {(s.layer, s.site, s.name) for s in sites} == {
        (k, s, f"layers.{k}.mlp.{m}") for k in (2, 3) for s, m in (("pre", "up"), ("post", "down"))
    }


def test_moduledict_stack_measured(one_thread):
    torch.manual_seed(0)
    model = DictLM(("0", "5"))
    own: dict = {}
    for k, b in model.layers.items():
        b.mlp.up.register_forward_hook(lambda m, a, o, k=int(k): own.setdefault(("", k, "pre"), []).append(o))
        b.mlp.down.register_forward_pre_hook(lambda m, a, k=int(k): own.setdefault(("", k, "post"), []).append(a[0]))
    probe = attach(model, every=1, dtype=torch.float64, mode="any")
    with torch.no_grad():
        model(_ids())
    _check(probe.compute(), own)
    probe.close()


class Stage(nn.Module):
    """A stage of blocks with a downsampling projection after them (Swin)."""

    def __init__(self, n, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.down = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.down(x)


class Staged(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.stages = nn.ModuleList([Stage(2), Stage(3)])

    def forward(self, ids):
        x = self.emb(ids)
        for s in self.stages:
            x = s(x)
        return x


def test_nested_stages_count_depth_through_the_stages():
    sites = discover_sites(Staged())
    names = [(s.layer, s.name) for s in sites if s.site == "pre"]
    assert names == [
        (0, "stages.0.blocks.0.mlp.up"),
        (1, "stages.0.blocks.1.mlp.up"),
        (2, "stages.1.blocks.0.mlp.up"),
        (3, "stages.1.blocks.1.mlp.up"),
        (4, "stages.1.blocks.2.mlp.up"),
    ]


class Shared(nn.Module):
    """One block applied at every depth (ALBERT-like), with the config and dummy inputs of an HF model."""

    def __init__(self, depth=3):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=depth)
        self.emb = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([Block()])

    @property
    def dummy_inputs(self):
        return {"ids": _ids(seed=7, shape=(2, 5))}

    def forward(self, ids):
        x = self.emb(ids)
        for _ in range(self.config.num_hidden_layers):
            x = self.layers[0](x)
        return x


def test_shared_layer_one_row_per_depth_over_several_forwards(one_thread):
    torch.manual_seed(0)
    model = Shared(depth=3)
    sites = discover_sites(model)
    assert sorted({s.layer for s in sites}) == [0, 1, 2]
    assert {s.name for s in sites} == {"layers.0.mlp.up", "layers.0.mlp.down"}
    probe = attach(model, every=1, dtype=torch.float64, mode="any")  # its trace forward is before our hooks
    own: dict = {}
    count = {"pre": 0, "post": 0}

    def keep(site, x):
        own.setdefault(("", count[site] % 3, site), []).append(x)
        count[site] += 1

    mlp = model.layers[0].mlp
    mlp.up.register_forward_hook(lambda m, a, o: keep("pre", o))
    mlp.down.register_forward_pre_hook(lambda m, a: keep("post", a[0]))
    with torch.no_grad():
        model(_ids(1))
        model(_ids(2, shape=(2, 7)))
    df = probe.compute()
    probe.close()
    _check(df, own)
    # the depths differ: the residual stream grows through the applications
    ranks = df[(df.bucket == "all") & (df.site == "pre")].sort_values("layer").hard_rank.to_numpy()
    assert len(set(np.round(ranks, 6))) == 3


class TwoFFN(nn.Module):
    """A block with a list of extra FFNs before its own (MobileBERT)."""

    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.ffn = nn.ModuleList([FFN(d, 20), FFN(d, 20)])
        self.up = nn.Linear(d, 20)
        self.act = nn.GELU()
        self.down = nn.Linear(20, d)

    def forward(self, x):
        x = x + self.attn(x)
        for f in self.ffn:
            x = x + f(x)
        return x + self.down(self.act(self.up(x)))


def test_several_ffns_per_block_are_stacks_by_path():
    model = nn.Sequential(nn.Embedding(32, 8), nn.Sequential(TwoFFN(), TwoFFN()))
    sites = discover_sites(model)
    got = {(s.stack, s.layer, s.site, s.name) for s in sites}
    assert ("", 1, "pre", "1.1.up") in got and ("", 1, "post", "1.1.down") in got
    assert ("ffn.0", 0, "pre", "1.0.ffn.0.up") in got and ("ffn.1", 1, "post", "1.1.ffn.1.down") in got
    assert len(got) == 2 * 2 * 3


class ConvBlock(nn.Module):
    """A channels-first FFN of kernel-1 Conv1d (SqueezeBERT): [B, C, T]."""

    def __init__(self, d=8, h=20):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.up = nn.Conv1d(d, h, 1)
        self.act = nn.GELU()
        self.down = nn.Conv1d(h, d, 1)

    def forward(self, x):  # x: [B, T, C]
        x = x + self.attn(x)
        y = self.down(self.act(self.up(x.transpose(1, 2))))
        return x + y.transpose(1, 2)


class ConvLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([ConvBlock(), ConvBlock()])

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.layers:
            x = b(x)
        return x


@pytest.mark.parametrize("named", [False, True], ids=["discovered", "named"])
def test_conv1d_sites_measured_over_channels(named, one_thread):
    torch.manual_seed(0)
    model = ConvLM()
    sites = {"pre": "layers.{layer}.up", "post": ("layers.{layer}.down", "input")} if named else ("pre", "post")
    own: dict = {}
    for k, b in enumerate(model.layers):  # [B, C, T] -> rows of C features, in token order
        b.up.register_forward_hook(lambda m, a, o, k=k: own.setdefault(("", k, "pre"), []).append(o.transpose(1, 2)))
        b.down.register_forward_pre_hook(
            lambda m, a, k=k: own.setdefault(("", k, "post"), []).append(a[0].transpose(1, 2))
        )
    probe = attach(model, sites=sites, every=1, dtype=torch.float64, mode="any")
    with torch.no_grad():
        model(_ids(shape=(3, 30)))  # T = 30 rows of D = 20: a wrong axis would give D = 30
    df = probe.compute()
    probe.close()
    assert set(df[df.bucket == "all"].dim) == {20}
    _check(df, own)


def test_weightless_site_beside_channels_first_conv_is_refused():
    with pytest.raises(SiteDiscoveryError, match=r"cannot tell the feature axis of layers\.0\.act.*Conv1d.*8 -> 20"):
        discover(ConvLM(), sites={"pre": "layers.{layer}.act"})


def test_wrong_axis_at_hook_time_is_refused_with_the_shapes():
    conv = ConvLM().layers[0].up
    (site,) = [s for s in discover_sites(ConvLM()) if s.layer == 0 and s.site == "pre"]
    got = []
    from dataclasses import replace

    site = replace(site, module=conv)
    handles = site.register(lambda x, rows: got.append(x))
    conv.forward = lambda x: torch.zeros(2, 7, 5)  # a width that is on no axis
    with pytest.raises(ValueError, match=r"cannot tell the feature axis of a \(2, 7, 5\) tensor: Conv1d has width 20"):
        conv(torch.zeros(2, 8, 5))
    for h in handles:
        h.remove()


class Twins(nn.Module):
    """Two equal FFN-like pairs side by side, no activation module to tell them apart."""

    def __init__(self, d=8):
        super().__init__()
        self.a_in, self.a_out = nn.Linear(d, 20), nn.Linear(20, d)
        self.b_in, self.b_out = nn.Linear(d, 20), nn.Linear(20, d)


def test_refusal_names_candidates_shapes_and_rule():
    model = nn.Sequential(nn.Embedding(32, 8), nn.ModuleList([Twins(), Twins()]))
    with pytest.raises(NoFFNError) as e:
        discover_sites(model)
    text = str(e.value)
    assert "FFN candidates were found but none could be measured" in text
    assert "has no FFN" not in text
    assert "a_out" in text and "b_out" in text and "a_in 8->20" in text
    assert "equal on every rule" in text and "layer 1" in text


def test_no_pair_at_all_says_no_ffn():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    model = nn.Sequential(nn.Embedding(32, 8), nn.ModuleList([Mixer(), Mixer()]))
    with pytest.raises(NoFFNError, match="has no FFN"):
        discover_sites(model)


def test_a_stack_with_an_unmeasurable_block_is_named_not_dropped():
    """A stack whose blocks hold only ambiguous candidates beside a measured stack: warned, by name."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList([Twins(), Twins()])
            self.dec = nn.ModuleList([Block(), Block()])

    found = discover(Two())
    assert {s.stack for s in found.sites} == {"dec"}
    assert {(sk.stack, sk.layer) for sk in found.skipped} == {("enc", 0), ("enc", 1)}
    assert "ambiguous FFN" in found.describe()
    with pytest.warns(UserWarning, match=r"not measured.*enc"):
        probe = attach(Two(), every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing captured: no forward ran
        probe.close()


def test_shared_layer_trace_failure_warns_not_silent():
    model = Shared(depth=3)
    type(model).dummy_inputs = property(lambda self: {"nope": 1})
    try:
        with pytest.warns(UserWarning, match="may run blocks at several depths"):
            sites = discover_sites(model)
    finally:
        type(model).dummy_inputs = Shared.dummy_inputs
    assert {s.layer for s in sites} == {0}


def test_no_warning_for_plain_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(discover_sites(DictLM())) == 8
