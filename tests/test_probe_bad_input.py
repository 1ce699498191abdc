"""Bad input fails near its source with a clear message, and leaves earlier records intact."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.probe import NonFiniteActivationError, ParquetSink, SinkError, SiteDiscoveryError
from capscale.spectrum import FrequencyTable

V = 50


def ids(seed, b=2, s=6, high=V):
    return torch.randint(0, high, (b, s), generator=torch.Generator().manual_seed(seed))


def test_non_finite_activations_name_layer_and_site_and_keep_earlier_records(tmp_path):
    model = toy()
    out = tmp_path / "spectra.parquet"
    probe = capscale.attach(model, every=1, sinks=[ParquetSink(out)])
    model(ids(0))
    probe.step()  # step 0 written
    model(ids(1))
    before = {k: (accs[0].count, accs[0].scatter.clone()) for k, accs in probe._pool.items() if accs[0].count}
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.bias[3] = float("nan")
    with pytest.raises(
        NonFiniteActivationError, match=r"layer 1 site 'pre' \(blocks\.1\.mlp\.c_fc output\), step 1"
    ) as err:
        model(ids(2))
    assert (err.value.layer, err.value.site, err.value.step) == (1, "pre", 1)
    # nothing of the bad forward reached layer 1's pre accumulator (layer 0 ran before it, legitimately)
    for k, (n, s) in before.items():
        if k[1] >= 2:  # sites of layer 1
            assert probe._pool[k][0].count == n and torch.equal(probe._pool[k][0].scatter, s)
    probe.close(flush=False)
    df = pd.read_parquet(out)
    assert list(df.step.unique()) == [0] and len(df) == 4 and df.soft_rank.notna().all()


def test_token_ids_out_of_vocabulary():
    table = FrequencyTable(np.arange(1, 21))  # vocab 20 < 50
    model = toy()
    probe = capscale.attach(model, every=1, freq_table=table)
    with pytest.raises(ValueError, match=r"frequency table.*\[0, 19\]"):
        model(ids(0))
    assert all(a.count == 0 for accs in probe._pool.values() for a in accs)
    with pytest.raises(ValueError, match="out of range"):
        probe.batch(token_ids=torch.tensor([[25]]))
    probe.close(flush=False)


def test_empty_bucket_is_recorded_as_insufficient():
    counts = np.ones(V, dtype=np.int64)
    counts[0] = counts[1] = 1000
    counts[2] = 800
    table = FrequencyTable(counts)  # HEAD {0, 1}, MID {2}, TAIL the rest
    model = toy()
    probe = capscale.attach(model, every=1, freq_table=table)
    model(torch.tensor([[0, 1, 5, 6, 0, 7], [1, 1, 8, 0, 9, 5]]))  # no MID token
    df = probe.compute()
    probe.close()
    mid = df[df.bucket == "mid"]
    assert len(mid) == 4 and (mid.sampling_status == "insufficient").all() and mid.soft_rank.isna().all()
    assert (mid.n_samples == 0).all() and mid.eigenvalues.isna().all()
    head = df[(df.bucket == "head") & (df.site == "pre")]
    assert (head.n_samples == 6).all() and head.soft_rank.notna().all()


def test_identical_rows_give_no_ranks_but_no_crash():
    table = FrequencyTable(np.r_[1000, np.ones(V - 1, dtype=np.int64)])
    model = toy()  # no positions: every occurrence of a token has the same activations
    probe = capscale.attach(model, every=1, freq_table=table)
    model(torch.tensor([[0, 3, 0, 4], [0, 5, 6, 0]]))
    df = probe.compute()
    probe.close()
    head = df[df.bucket == "head"]
    assert (head.n_samples == 4).all() and head.soft_rank.isna().all() and (head.trace == 0).all()
    assert df[df.bucket == "all"].soft_rank.notna().all() and df[df.bucket == "mid"].soft_rank.notna().all()


def test_buckets_need_token_ids():
    table = FrequencyTable(np.arange(1, V + 1))
    model = toy()

    class FromEmbeddings(torch.nn.Module):  # called with embeddings, not ids
        def __init__(self):
            super().__init__()
            self.blocks = model.blocks

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    wrapped = FromEmbeddings()
    probe = capscale.attach(wrapped, every=1, freq_table=table)
    with pytest.raises(ValueError, match=r"layer 0 site 'pre'.*no token ids.*probe.batch"):
        wrapped(torch.randn(2, 6, 8))
    with probe.batch(token_ids=ids(0)):  # given explicitly, they work
        wrapped(torch.randn(2, 6, 8))
    assert probe.compute().query("bucket == 'all'").n_samples.eq(12).all()
    probe.close()


def test_mask_shape_mismatch_names_the_site():
    model = toy()
    probe = capscale.attach(model, every=1)
    with (
        probe.batch(mask=torch.ones(3, 6)),
        pytest.raises(ValueError, match=r"layer 0 site 'pre'.*18 entries"),
    ):
        model(ids(0))
    probe.close(flush=False)


def test_sink_directory_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SinkError, match="cannot write"):
        ParquetSink(blocker / "run" / "spectra.parquet")
    with pytest.raises(SinkError):
        capscale.probe.JSONLSink(blocker / "spectra.jsonl")
    if os.geteuid() != 0:  # root writes anywhere: the permission case only means something for others
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(SinkError):
            ParquetSink(ro / "spectra.parquet")


def test_unknown_architecture():
    with pytest.raises(SiteDiscoveryError, match="Name the sites explicitly"):
        capscale.attach(torch.nn.Sequential(torch.nn.Linear(3, 3)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_state_is_named_before_it_reaches_lapack(bad):
    # the accumulator's input guard keeps NaN/Inf out; a state that holds one anyway (here put
    # there by hand) is refused by its diagonal, which every scatter entry is bounded by
    model = toy()
    probe = capscale.attach(model, every=1, sites=("pre",))
    model(ids(0))
    probe._pool[("full", 1)][0].moments().scatter[2, 2] = bad
    with pytest.raises(capscale.probe.SpectrumError, match="layer 1 site 'pre' bucket 'all' at step 0.*NaN or Inf"):
        probe.compute()
    probe.close(flush=False)


def test_indefinite_state_is_a_clear_error():
    model = toy()
    probe = capscale.attach(model, every=1, sites=("pre",))
    model(ids(0))
    acc = probe._pool[("full", 1)][0]  # sites: (0, pre), (1, pre)
    state = acc.moments().scatter  # the state itself, with every batch added in
    state[0, 0] = -1e3 * state.abs().max()  # no covariance has this
    with pytest.raises(capscale.probe.SpectrumError, match="layer 1 site 'pre' bucket 'all' at step 0.*indefinite"):
        probe.compute()
    probe.close(flush=False)
