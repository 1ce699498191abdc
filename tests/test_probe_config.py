"""attach takes the telemetry config the harness's [telemetry] table builds: every field
reaches the Probe, keywords override it, and an unknown setting is refused in one line."""

import dataclasses

import pytest
import torch
from test_probe_sites import toy

import capscale
from capscale.probe import TelemetryConfig
from capscale.spectrum import FrequencyTable
from capscale.train.config import RunConfig

# the probes here are closed before any forward: their empty windows are warned about
pytestmark = pytest.mark.filterwarnings("ignore::capscale.probe.NothingCapturedWarning")


def _table():
    return FrequencyTable.from_token_ids([torch.arange(50).repeat_interleave(torch.arange(50, 0, -1))], vocab_size=50)


def test_the_harness_table_builds_the_probes_config_and_every_field_reaches_the_probe():
    table = {
        "every": 6,
        "window": 3,
        "sites": ["post"],
        "buckets": False,
        "monitor_every": 2,
        "dtype": "float64",
        "background": "host",
        "states": "host",
        "spectrum": "lanczos",
    }
    cfg = RunConfig.from_dict({"telemetry": table})
    assert type(cfg.telemetry) is TelemetryConfig  # the probe's own class, not a copy of it
    assert set(table) | {"enabled"} == {f.name for f in dataclasses.fields(TelemetryConfig)}
    probe = capscale.attach(toy(), cfg.telemetry, freq_table=_table(), total_steps=30)
    try:
        assert (probe.schedule.every, probe.schedule.window, probe.schedule.total_steps) == (6, 3, 30)
        assert {probe.sites[i].site for i in probe._full_idx} == {"post"}  # "pre" is only monitored
        assert probe.freq_table is None  # buckets = false
        assert probe.monitor is not None and probe.monitor.every == 2
        assert probe.dtype == torch.float64
        assert probe.background == "host"
        assert probe.states == "host" and probe.spectrum == "lanczos"
    finally:
        probe.close()
    # buckets = true (the default) hands the frequency table over; the defaults are the table's
    probe = capscale.attach(toy(), TelemetryConfig(), freq_table=_table())
    try:
        assert probe.freq_table is not None and probe.schedule.every == 50 and probe.monitor is None
        assert {s.site for s in probe.sites} == {"pre", "post"} and probe.background is False
    finally:
        probe.close()


def test_keywords_override_the_config_and_attach_keeps_its_own_defaults_without_one():
    probe = capscale.attach(toy(), TelemetryConfig(every=6, window=2), window=3, sites=("pre",))
    try:
        assert (probe.schedule.every, probe.schedule.window) == (6, 3)
        assert {s.site for s in probe.sites} == {"pre"}
    finally:
        probe.close()
    probe = capscale.attach(toy())
    try:
        assert probe.schedule.every == 200 and probe.schedule.window == 1
    finally:
        probe.close()


def test_an_unknown_setting_or_a_disabled_config_is_refused_in_one_line():
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['evry'\]") as err:
        capscale.attach(toy(), evry=5)
    assert "\n" not in str(err.value) and "every" in str(err.value)  # it names the valid settings
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['telemetry.evry'\]"):
        RunConfig.from_dict({"telemetry": {"evry": 5}})
    with pytest.raises(ValueError, match="enabled=false"):
        capscale.attach(toy(), TelemetryConfig(enabled=False))
    with pytest.raises(TypeError, match="must be a TelemetryConfig"):
        capscale.attach(toy(), {"every": 5})
