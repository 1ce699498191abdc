"""Bad input fails near its source with a clear message, and leaves earlier records intact."""

import json
import os
import warnings

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
def test_a_non_finite_state_is_named_and_recorded_not_raised(bad):
    # the accumulator's input guard keeps NaN/Inf out; a state that holds one anyway (here put
    # there by hand) is caught by its diagonal, which every scatter entry is bounded by, before
    # LAPACK sees it: a warning names it and its row says so (issue 30, item 4: training goes on)
    model = toy()
    probe = capscale.attach(model, every=1, sites=("pre",))
    model(ids(0))
    probe._pool[("full", 1)][0].moments().scatter[2, 2] = bad
    with pytest.warns(UserWarning, match="layer 1 site 'pre' bucket 'all' at step 0.*NaN or Inf.*'non_finite'"):
        df = probe.compute()
    row = df[df.layer == 1].iloc[0]
    assert row.spectrum_status == "non_finite" and np.isnan(row.soft_rank) and row.eigenvalues is None
    assert df[df.layer == 0].iloc[0].spectrum_status == "ok"
    probe.close(flush=False)


def test_an_indefinite_state_is_named_and_recorded_not_raised():
    model = toy()
    probe = capscale.attach(model, every=1, sites=("pre",))
    model(ids(0))
    acc = probe._pool[("full", 1)][0]  # sites: (0, pre), (1, pre)
    state = acc.moments().scatter  # the state itself, with every batch added in
    state[0, 0] = -1e3 * state.abs().max()  # no covariance has this
    with pytest.warns(UserWarning, match="layer 1 site 'pre' bucket 'all' at step 0.*indefinite"):
        df = probe.compute()
    assert list(df.spectrum_status) == ["ok", "indefinite"] and df.soft_rank.isna().tolist() == [False, True]
    probe.close(flush=False)


def test_tiny_float32_activations_never_stop_training(tmp_path):
    # issue 30, item 4: activations of 1e-22 in float32 have subnormal products; their
    # covariance's round-off is as large as the covariance, and probe.step() raised
    model = toy()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.c_fc.weight.mul_(1e-22)
            block.mlp.c_fc.bias.mul_(1e-22)
    cfg = {"optimizer": "adamw", "seed": 0, "ffn_width": 32}
    probe = capscale.attach(model, every=1, sites=("pre",), out=tmp_path / "run", run_config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(3):
            model(ids(i))
            probe.step()
        probe.close()
    df = pd.read_parquet(tmp_path / "run" / "spectra.parquet")
    assert sorted(df.step.unique()) == [0, 1, 2]
    assert set(df.spectrum_status) <= {"indefinite", "tiny_variance"}
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "done"


RUN_CONFIG = {"optimizer": "adamw", "seed": 0, "ffn_width": 32}


def test_a_second_attach_to_the_same_out_in_one_process_is_refused(tmp_path):
    # issue 30, item 6: re-running a notebook cell made two writers of one run directory
    model = toy()
    probe = capscale.attach(model, every=1, out=tmp_path / "run", run_config=RUN_CONFIG)
    with pytest.raises(ValueError, match="already being written by this process"):
        capscale.attach(toy(), every=1, out=tmp_path / "run", run_config=RUN_CONFIG)
    model(ids(0))
    probe.step()
    probe.close()
    assert len(pd.read_parquet(tmp_path / "run" / "spectra.parquet")) == 4  # one writer's rows only


def test_close_after_a_non_finite_activation_records_diverged(tmp_path):
    # issue 30, item 7: the harness records "diverged"; attach's writer recorded "done"
    model = toy()
    probe = capscale.attach(model, every=1, out=tmp_path / "run", run_config=RUN_CONFIG)
    model(ids(0))
    probe.step()
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.bias[3] = float("nan")
    with pytest.raises(NonFiniteActivationError):
        model(ids(1))
    probe.close()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "diverged" and "non-finite activations at layer 1 site 'pre'" in status["reason"]


@pytest.mark.parametrize("layers", [[-1], -1, [0, -2]])
def test_negative_layers_are_refused(layers, tmp_path):
    with pytest.raises(ValueError, match="layers must be layer indices >= 0"):
        capscale.attach(toy(), layers=layers, out=tmp_path / "run", run_config=RUN_CONFIG)
    assert not (tmp_path / "run").exists()
