"""Acceptance: probe ranks equal ranks computed in the test from independently captured activations.

For HF GPT-2 (Conv1D), HF Llama (gated MLP), capscale's GPT and a
TransformerLens model (tiny random configs, nothing downloaded), the test
registers its own hooks on the modules it names itself, keeps every
activation, and computes covariance, eigenvalues and ranks in float64 with
NumPy: HEAD/MID/TAIL by input token id, padding rows dropped, over two
windows of two steps with two micro-batches each.
"""

import numpy as np
import pytest
import torch
from test_probe_sites import hf_gpt2, hf_llama, our_gpt, tl_model, toy

import capscale
from capscale.spectrum import FrequencyTable

VOCAB = 64


def zipf_table(vocab=VOCAB):
    return FrequencyTable((1000 / np.arange(1, vocab + 1)).astype(np.int64) + 1)


def reference_modules(kind, model):
    """(layer, site) -> (module, 'output'|'input'), named by the test, not by capscale."""
    if kind == "gpt2":
        blocks = model.transformer.h
        return {
            (i, s): (getattr(b.mlp, m), c)
            for i, b in enumerate(blocks)
            for s, m, c in (("pre", "c_fc", "output"), ("post", "c_proj", "input"))
        }
    if kind == "llama":
        return {
            (i, s): (getattr(b.mlp, m), c)
            for i, b in enumerate(model.model.layers)
            for s, m, c in (("pre", "gate_proj", "output"), ("post", "down_proj", "input"))
        }
    if kind in ("ours", "toy"):
        return {
            (i, s): (getattr(b.mlp, m), c)
            for i, b in enumerate(model.blocks)
            for s, m, c in (("pre", "c_fc", "output"), ("post", "c_proj", "input"))
        }
    if kind == "tl":
        return {
            (i, s): (getattr(b.mlp, m), "output")
            for i, b in enumerate(model.blocks)
            for s, m in (("pre", "hook_pre"), ("post", "hook_post"))
        }
    raise AssertionError(kind)


class Recorder:
    """Keeps every activation of the named modules (float64 copies), per window."""

    def __init__(self, modules):
        self.rows = {k: [] for k in modules}
        self.handles = []
        for key, (mod, cap) in modules.items():
            if cap == "output":
                self.handles.append(mod.register_forward_hook(lambda m, a, o, key=key: self._keep(key, o)))
            else:
                self.handles.append(mod.register_forward_pre_hook(lambda m, a, key=key: self._keep(key, a[0])))

    def _keep(self, key, t):
        self.rows[key].append(t.detach().double().reshape(-1, t.shape[-1]).clone())

    def take(self):
        out = {k: torch.cat(v).numpy() for k, v in self.rows.items()}
        for v in self.rows.values():
            v.clear()
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def reference_ranks(x, keep):
    """soft/hard rank, eigenvalues and n of rows x[keep], all float64 NumPy."""
    rows = x[keep]
    if rows.shape[0] < 2:
        return None, rows.shape[0]
    lam = np.clip(np.linalg.eigvalsh(np.cov(rows, rowvar=False, ddof=1)), 1e-12, None)[::-1]
    p = lam / lam.sum()
    return {
        "soft_rank": float(np.exp(-(p * np.log(p)).sum())),
        "hard_rank": float(1 / (p**2).sum()),
        "eig": lam,
    }, rows.shape[0]


def build(kind):
    if kind == "toy":
        return toy(vocab=VOCAB, d=8, h=12)
    return {"gpt2": hf_gpt2, "llama": hf_llama, "ours": our_gpt, "tl": tl_model}[kind](vocab=VOCAB)


def run_and_check(kind, model, *, dtype, rtol, use_mask):
    table = zipf_table()
    model.train()
    rec = Recorder(reference_modules(kind, model))
    probe = capscale.attach(model, freq_table=table, every=2, window=2, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    expected = []  # per window: (ids, mask) of every forward
    fwd = []
    for step in range(4):
        for _micro in range(2):
            ids = torch.randint(0, VOCAB, (3, 12), generator=gen)
            ids[0, :3] = 0  # HEAD tokens certainly present
            mask = torch.ones_like(ids)
            if use_mask:
                mask[1, 9:] = 0  # right padding
                mask[2, 5:] = 0
            kwargs = {"attention_mask": mask} if use_mask else {}
            model(ids, **kwargs)
            fwd.append((ids, mask))
        probe.step()
        if step % 2 == 1:
            expected.append((fwd, rec.take()))
            fwd = []
    df = probe.compute()
    probe.close()
    rec.close()
    assert sorted(df["step"].unique()) == [0, 2]
    n_layers = len({k[0] for k in reference_modules(kind, model)})
    assert len(df) == 2 * n_layers * 2 * 4
    checked = 0
    for w, (forwards, acts) in enumerate(expected):
        ids = torch.cat([f[0].reshape(-1) for f in forwards]).numpy()
        keep = torch.cat([f[1].reshape(-1) for f in forwards]).numpy().astype(bool)
        buckets = table.bucket(ids)
        for (layer, site), x in acts.items():
            assert x.shape[0] == ids.size
            for b, name in enumerate(("all", "head", "mid", "tail")):
                sel = keep if name == "all" else keep & (buckets == b - 1)
                ref, n = reference_ranks(x, sel)
                row = df[(df.step == 2 * w) & (df.layer == layer) & (df.site == site) & (df.bucket == name)]
                assert len(row) == 1, (w, layer, site, name)
                row = row.iloc[0]
                assert row.n_samples == n
                if ref is None:
                    assert row.sampling_status == "insufficient" and np.isnan(row.soft_rank)
                    continue
                assert row.soft_rank == pytest.approx(ref["soft_rank"], rel=rtol)
                assert row.hard_rank == pytest.approx(ref["hard_rank"], rel=rtol)
                np.testing.assert_allclose(row.eigenvalues, ref["eig"], rtol=0, atol=rtol * ref["eig"][0])
                checked += 1
    assert checked >= 2 * n_layers * 2 * 3  # nearly every bucket had data


@pytest.mark.parametrize("kind", ["gpt2", "llama", "ours", "tl"])
def test_probe_ranks_equal_independent_float64_ranks(kind):
    model = build(kind)
    run_and_check(kind, model, dtype=torch.float64, rtol=1e-6, use_mask=kind in ("gpt2", "llama"))


def test_default_float32_gemm_is_close_to_float64():
    # The default GEMM runs in the activations' own float32 (merged into float64
    # states): on these activations it agrees with float64 to ~1e-7.
    run_and_check("toy", build("toy"), dtype=None, rtol=1e-5, use_mask=False)
