"""attach(states="host"): float64 states in host memory fed from one device GEMM buffer equal the
device layout; the copies are waited for in order; probe.memory() matches the formula; the layout
and spectrum methods are chosen and said; Lanczos and hard-only rows."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.probe import hoststates
from capscale.probe.hoststates import HostMoments, HostStage, Transfer, choose_layout
from capscale.spectrum import FrequencyTable
from capscale.spectrum._torch import FOLD, WindowMoments

torch.set_num_threads(1)
V = 50
TABLE = FrequencyTable((1000 / np.arange(1, V + 1)).astype(np.int64) + 1)
H = 24  # FFN width of the toy model


class LateTransfer(Transfer):
    """A copy lands only when it is waited for (as an asynchronous device copy may), reading its
    source as it was when queued (stream order); staging buffers start as NaN, so a state read
    before its copy was waited for, or a slot reused too early, shows."""

    def __init__(self):
        self.started = self.waited = 0

    def host_buffer(self, shape, dtype):
        return torch.full(shape, math.nan, dtype=dtype)

    def start(self, dst, src):
        self.started += 1
        return (dst, src.clone())

    def wait(self, token):
        self.waited += 1
        dst, src = token
        dst.copy_(src)


def run(states, steps=5, dtype="float64", transfer=None, **kw):
    model = toy(d=8, h=H)
    g = torch.Generator().manual_seed(5)
    probe = capscale.attach(model, every=2, window=2, freq_table=TABLE, dtype=dtype, states=states, **kw)
    probe.transfer = transfer
    for _ in range(steps):
        for _ in range(3):  # micro-batches
            model(torch.randint(0, V, (4, 6), generator=g))
        probe.step()
    df = probe.compute()
    return probe, df


def _close(a: pd.DataFrame, b: pd.DataFrame, rel: float):
    assert len(a) == len(b) > 0
    for col in ("soft_rank", "hard_rank", "renyi_rank_inf", "trace", "lambda_max"):
        np.testing.assert_allclose(a[col], b[col], rtol=rel)
    pd.testing.assert_series_equal(a["spectrum_status"], b["spectrum_status"])
    for x, y in zip(a["eigenvalues"], b["eigenvalues"]):
        if y is None:  # a bucket with < 2 samples: none on both sides
            assert x is None
            continue
        np.testing.assert_allclose(x, y, rtol=rel, atol=rel * max(y))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_host_states_equal_device_states(dtype):
    dev_probe, dev = run("device", dtype=dtype)
    host_probe, host = run("host", dtype=dtype)
    assert dev_probe.layout == "device" and host_probe.layout == "host"
    assert isinstance(host_probe._pool[("full", 0)][0], HostMoments)
    # float64 GEMMs: the same sums up to their order; float32: the device layout's CPU path sums
    # PARTIAL_FOLD batches in float32 first, the host layout widens each batch (closer to exact).
    _close(host, dev, rel=1e-12 if dtype == "float64" else 1e-5)


def test_late_copies_are_waited_for_in_order():
    _, dev = run("device")
    late = LateTransfer()
    probe, host = run("host", transfer=late)
    _close(host, dev, rel=1e-12)
    assert late.started > 0 and late.waited == late.started  # every copy waited for before its add


def test_stage_reuses_a_slot_only_after_its_copy_landed():
    late = LateTransfer()
    stage = HostStage(late, slots=2)
    accs = [HostMoments(3, stage) for _ in range(2)]
    ref = [WindowMoments(3, "cpu") for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    for j in range(7):
        mean, scatter = torch.randn(3, generator=g), torch.randn(3, 3, generator=g)
        scatter = scatter @ scatter.T
        accs[j % 2].add(5, mean, scatter)
        ref[j % 2].add(5, mean, scatter)
    assert stage.nbytes() == 2 * (9 + 3) * 4  # two float32 slots of each shape, never more
    for a, r in zip(accs, ref):
        got, want = a.moments(), r.moments()
        assert got.count == want.count
        torch.testing.assert_close(got.scatter, want.scatter, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.mean, want.mean, rtol=1e-12, atol=0)


def test_memory_matches_the_formula():
    # 2 layers × 2 sites × 3 buckets (HEAD/MID/TAIL; "all" is their merge) of H² float64 states;
    # below FOLD means per state.
    n_states, d = 2 * 2 * 3, H
    probe, _ = run("device", steps=1)
    # Within a window (step 1 of 2): the states are held.
    detail = probe.memory(detail=True)
    states = detail[("cpu", "states")]
    assert n_states * d * d * 8 <= states <= n_states * (d * d + FOLD * d) * 8
    assert probe.memory()["cpu"] == sum(detail.values())
    # One rows buffer (a micro-batch of 4 × 6 tokens, float64 GEMM) serves every site.
    assert detail[("cpu", "rows")] == 4 * 6 * d * 8

    host, _ = run("host", steps=1, dtype="float32")
    detail = host.memory(detail=True)
    assert n_states * d * d * 8 <= detail[("cpu", "states")] <= n_states * (d * d + FOLD * d) * 8
    rows = 4 * 6  # one micro-batch's tokens: the largest batch a site saw
    # One shared GEMM buffer and one rows buffer for every site, in the GEMM dtype (no float64 copy).
    assert detail[("cpu", "gemm")] == d * d * 4
    assert detail[("cpu", "rows")] == rows * d * 4
    # Two staging slots for the scatter and two for the mean, float32.
    assert detail[("cpu", "staging")] == 2 * (d * d + d) * 4


def test_layout_is_said():
    probe, _ = run("auto", steps=1)
    assert probe.layout == "device"  # a CPU: states are host memory anyway
    assert "states: device (cpu" in probe.description
    fresh = capscale.attach(toy(d=8, h=H), states="host")
    assert "decided at the first measured forward" in fresh.description
    with pytest.raises(ValueError, match="states must be one of"):
        capscale.attach(toy(d=8, h=H), states="gpu")


def test_auto_layout_follows_free_device_memory(monkeypatch):
    need = 7_200_000_000
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80_000_000_000, 80_000_000_000))
    assert choose_layout("auto", torch.device("cuda:0"), need)[0] == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20_000_000_000, 80_000_000_000))
    layout, note = choose_layout("auto", torch.device("cuda:0"), need)
    assert layout == "host" and "7.2 GB" in note
    assert choose_layout("device", torch.device("cuda:0"), need)[0] == "device"
    assert hoststates.transfer_for(torch.device("cpu")).__class__ is Transfer


def test_state_bytes_of_tensor_parallel_blocks_and_the_note(monkeypatch):
    """paper-160m at tp = 8: 24 sites × 3 buckets of 384 × 3,072 float64 rows = 0.68 GB, not 5.4 GB;
    the note says that much of the states stays on the device in either layout."""
    sites = 24
    blocks = hoststates.state_bytes([3072] * sites, [3] * sites, [384] * sites)
    assert blocks == sites * 3 * 384 * 3072 * 8 == hoststates.state_bytes([3072] * sites, [3] * sites) // 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20_000_000_000, 80_000_000_000))
    layout, note = choose_layout("auto", torch.device("cuda:0"), blocks, blocks)
    assert layout == "device" and "0.679 GB ≤ 0.25" in note
    assert "row blocks 0.679 GB, on the device in either layout" in note
    assert "row blocks" not in choose_layout("auto", torch.device("cuda:0"), blocks)[1]


def test_hard_only_rows_equal_the_exact_hard_rank():
    _, exact = run("device")
    _, hard = run("device", spectrum="hard-only")
    ok = exact["spectrum_status"] == "ok"
    assert ok.sum() > 0
    np.testing.assert_allclose(hard["hard_rank"][ok], exact["hard_rank"][ok], rtol=1e-10)
    np.testing.assert_allclose(hard["trace"][ok], exact["trace"][ok], rtol=1e-10)
    assert (hard["spectrum_method"] == "hard-only").all() and (exact["spectrum_method"] == "exact").all()
    assert hard["soft_rank"].isna().all() and hard["eigenvalues"].isna().all()
    assert (exact["soft_rank_stderr"] == 0).all()


def test_lanczos_rows_are_close_to_exact_and_state_their_error():
    _, exact = run("host")
    _, est = run("host", spectrum="lanczos")
    ok = (exact["spectrum_status"] == "ok") & (exact["n_samples"] > 2 * H)
    assert ok.sum() >= 8
    assert (est["spectrum_method"] == "lanczos").all() and est["eigenvalues"].isna().all()
    np.testing.assert_allclose(est["soft_rank"][ok], exact["soft_rank"][ok], rtol=0.01)
    np.testing.assert_allclose(est["hard_rank"][ok], exact["hard_rank"][ok], rtol=1e-10)
    np.testing.assert_allclose(est["lambda_max"][ok], exact["lambda_max"][ok], rtol=1e-6)
    assert (est["soft_rank_stderr"][ok] >= 0).all()
    assert est["js_divergence_pre_post"].isna().all()  # it needs the eigenvalues
    # The same frame shape and dtypes as the exact rows: a run directory holds either.
    assert list(est.columns) == list(exact.columns)
    assert (est.dtypes == exact.dtypes).all()


def test_telemetry_config_carries_the_layout_and_spectrum(monkeypatch):
    from capscale.train import config as cfgmod
    from capscale.train import loop

    tel = cfgmod.TelemetryConfig(states="host", spectrum="lanczos")
    with pytest.raises(ValueError, match="telemetry.states"):
        cfgmod.TelemetryConfig(states="gpu")
    with pytest.raises(ValueError, match="telemetry.spectrum"):
        cfgmod.TelemetryConfig(spectrum="approx")
    assert cfgmod.PRESETS["paper-160m"]["telemetry"]["states"] == "auto"
    assert cfgmod.PRESETS["paper-350m"]["telemetry"]["states"] == "auto"
    run = cfgmod.RunConfig(telemetry=tel).to_dict()
    # Where the states live does not change the numbers: not part of a run's identity; the method does.
    other = {**run, "telemetry": {**run["telemetry"], "states": "device"}}
    assert cfgmod.run_identity(run) == cfgmod.run_identity(other)
    changed = {**run, "telemetry": {**run["telemetry"], "spectrum": "exact"}}
    assert cfgmod.run_identity(run) != cfgmod.run_identity(changed)

    seen = {}
    monkeypatch.setattr(capscale.probe, "attach", lambda model, **kw: seen.update(kw) or "probe")
    loop._attach_probe(cfgmod.RunConfig(telemetry=tel), None, None, 0)
    assert seen["config"].states == "host" and seen["config"].spectrum == "lanczos"  # the config, whole


def test_a_run_directory_of_lanczos_rows_is_read_by_the_analysis(tmp_path):
    from capscale.analysis import load_sweep

    model = toy(d=8, h=H)
    g = torch.Generator().manual_seed(2)
    out = tmp_path / "run"
    probe = capscale.attach(
        model, every=2, out=out, run_config={"optimizer": "sgd", "seed": 1}, spectrum="lanczos", states="host"
    )
    for step in range(4):
        model(torch.randint(0, V, (8, 6), generator=g))
        probe.log(step, loss=1.0)
        probe.step()
    probe.close()
    raw = pd.read_parquet(out / "spectra.parquet")
    assert (raw["spectrum_method"] == "lanczos").all() and raw["eigenvalues"].isna().all()
    sweep = load_sweep(out)
    assert len(sweep.runs) == 1 and len(sweep.spectra) == len(raw)
    assert sweep.spectra["soft_rank"].notna().all()


def test_host_states_with_background_and_monitor_equal_device_states():
    kw = {"background": "host", "monitor_every": 1}
    dev_probe, dev = run("device", **kw)
    host_probe, host = run("host", **kw)
    _close(host, dev, rel=1e-12)
    a, b = dev_probe.monitor_frame(), host_probe.monitor_frame()
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(b["hard_rank"], a["hard_rank"], rtol=1e-12)
    dev_probe.close()
    host_probe.close()


def test_banded_host_add_keeps_the_whole_upper_triangle():
    # Wider than a band (hoststates.BAND): every band's upper part must reach the state.
    d = 2 * hoststates.BAND + 37
    stage = HostStage(Transfer())
    host, ref = HostMoments(d, stage), WindowMoments(d, "cpu")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(40, d, generator=g)
        scatter = (x.T @ x).float()  # a float32 GEMM result, as a device hands over
        mean = torch.randn(d, generator=g)
        host.add(40, mean, scatter)
        ref.add(40, mean, scatter.double())
    torch.testing.assert_close(host.moments().scatter, ref.moments().scatter, rtol=1e-12, atol=1e-9)
