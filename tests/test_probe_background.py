"""attach(background=...): windows decomposed by a worker thread give the synchronous rows, in order;
compute/flush/close wait for them, and a worker's error surfaces at the next call."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.probe import SpectrumError, decomposition
from capscale.probe.probe import NothingCapturedWarning
from capscale.probe.records import spectrum_rows
from capscale.spectrum import FrequencyTable
from capscale.spectrum._torch import Moments

torch.set_num_threads(1)
V = 50


class ListSink:
    def __init__(self):
        self.frames, self.scalars, self.closed = [], [], False

    def write_spectra(self, df):
        self.frames.append(df)

    def write_scalars(self, step, scalars):
        self.scalars.append((step, scalars))

    def close(self):
        self.closed = True


def run(background, steps=7, **kw):
    model, sink = toy(), ListSink()
    g = torch.Generator().manual_seed(3)
    table = FrequencyTable((1000 / np.arange(1, V + 1)).astype(np.int64) + 1)
    probe = capscale.attach(model, every=2, freq_table=table, sinks=[sink], background=background, **kw)
    for _ in range(steps):
        model(torch.randint(0, V, (3, 8), generator=g))
        model(torch.randint(0, V, (3, 8), generator=g))  # two micro-batches per step
        probe.step()
    df = probe.compute()
    probe.close()
    return df, sink


@pytest.mark.parametrize("background", [True, "host"])
def test_background_rows_equal_the_synchronous_rows(background):
    sync_df, sync_sink = run(False)
    bg_df, bg_sink = run(background)
    assert len(sync_df) == 4 * 4 * 4  # windows at steps 0, 2, 4, 6 × 2 layers × 2 sites × (all + 3 buckets)
    pd.testing.assert_frame_equal(bg_df, sync_df)  # exact, eigenvalue lists included
    assert bg_sink.closed
    pd.testing.assert_frame_equal(
        pd.concat(bg_sink.frames, ignore_index=True), pd.concat(sync_sink.frames, ignore_index=True)
    )
    assert bg_sink.scalars == sync_sink.scalars


def test_background_compute_waits_and_close_flushes():
    model, sink = toy(), ListSink()
    probe = capscale.attach(model, every=1, background=True, sinks=[sink])
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids)
    probe.step()  # window 0 handed to the worker
    model(ids)
    df = probe.compute(reset=False)  # waits for window 0, adds the open window 1 so far
    assert sorted(df.step.unique()) == [0, 1]
    probe.close()  # flushes window 1 through the worker and waits
    assert [s for s, _ in sink.scalars] == [0, 1]


def test_the_worker_runs_torch_on_its_own_thread_and_training_keeps_its_threads():
    # a worker thread with its own OpenMP team slowed every training step while it lived
    # (docs/benchmarks.md); its torch ops run single-threaded, the caller's setting is untouched
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = toy()
        probe = capscale.attach(model, every=1, background=True)
        model(torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0)))
        probe.step()  # window 0 goes to the worker
        assert probe._worker.submit(torch.get_num_threads).result() == 1
        with warnings.catch_warnings():  # training ended as window 1 opened: nothing to warn about,
            warnings.simplefilter("error", NothingCapturedWarning)  # as without background
            probe.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_wait_delivers_finished_windows_and_leaves_the_open_one_open():
    model, sink = toy(), ListSink()
    probe = capscale.attach(model, every=2, window=2, background=True, sinks=[sink])
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # window [0, 2) finishes at the second step; [2, 4) is open after the third
        model(ids)
        probe.step()
    probe.wait()
    assert probe.pending == 0 and [s for s, _ in sink.scalars] == [0]
    assert probe.window_start == 2  # still open: wait() does not cut it short
    model(ids)
    probe.step()
    probe.close()
    assert [s for s, _ in sink.scalars] == [0, 2]
    rows = pd.concat(sink.frames)
    assert (rows[rows.step == 2].n_samples == 2 * 2 * 8).all()  # both steps of the second window


def test_worker_error_surfaces_at_the_next_call(monkeypatch):
    def broken(entries, batched=None):
        raise SpectrumError("layer 0 site 'pre' bucket 'all' at step 0: injected")

    monkeypatch.setattr(decomposition, "spectrum_rows", broken)
    model = toy()
    probe = capscale.attach(model, every=1, background=True)
    model(torch.randint(0, V, (2, 8)))
    probe.step()  # no error here: the window is decomposed off the training path
    with pytest.raises(SpectrumError, match="injected"):
        probe.compute()
    probe.close(flush=False)  # the worker is shut down; nothing hangs


def test_bad_background_value_is_refused():
    with pytest.raises(ValueError, match="background must be"):
        capscale.attach(toy(), background="gpu")


def test_batched_eigvalsh_path_equals_one_by_one():
    g = torch.Generator().manual_seed(1)
    entries = []
    for j in range(5):
        x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7)
        xc = x - x.mean(0)
        entries.append((Moments(40, x.mean(0), xc.T @ xc), {"step": 0, "layer": j, "site": "pre", "bucket": "all"}))
    entries.append(
        (Moments(1, torch.zeros(6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)), entries[0][1])
    )
    for e in entries:
        e[1]["module"] = "m"
    one = spectrum_rows(entries, batched=False)
    many = spectrum_rows(entries, batched=True)  # the accelerator path: one stacked eigvalsh
    assert [r["spectrum_status"] for r in many] == ["ok"] * 5 + ["insufficient"]
    for a, b in zip(one[:5], many[:5]):
        np.testing.assert_allclose(b["eigenvalues"], a["eigenvalues"], rtol=1e-10)
        assert b["soft_rank"] == pytest.approx(a["soft_rank"], rel=1e-10)
