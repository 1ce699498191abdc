"""capscale.probe: where and when to look inside a torch model, and where the records go.

    probe = capscale.attach(model, every=200, freq_table=table, sinks=[ParquetSink("spectra.parquet")])
    for step, batch in enumerate(loader):
        loss = model(batch).loss; loss.backward(); opt.step()
        probe.step()
    probe.close()

Knows nothing of training: it sees forwards, steps and sinks.
"""

from capscale.probe.accumulate import NonFiniteActivationError
from capscale.probe.config import TelemetryConfig
from capscale.probe.posthoc import measure_model
from capscale.probe.probe import MODES, NothingCapturedWarning, Probe, attach
from capscale.probe.records import COLUMNS, SpectrumError, scalar_summary
from capscale.probe.schedule import Schedule
from capscale.probe.sinks import (
    ConsoleSink,
    JSONLSink,
    ParquetSink,
    Sink,
    SinkError,
    TensorBoardSink,
    WandbSink,
)
from capscale.probe.sites import (
    ARCHITECTURES,
    SITE_NAMES,
    Architecture,
    Discovery,
    NoFFNError,
    Site,
    SiteDiscoveryError,
    SiteSpec,
    Skipped,
    discover,
    discover_sites,
)

__all__ = [
    "ARCHITECTURES",
    "COLUMNS",
    "MODES",
    "SITE_NAMES",
    "Architecture",
    "ConsoleSink",
    "Discovery",
    "JSONLSink",
    "NoFFNError",
    "NonFiniteActivationError",
    "NothingCapturedWarning",
    "ParquetSink",
    "Probe",
    "Schedule",
    "Sink",
    "SinkError",
    "Site",
    "SiteDiscoveryError",
    "SiteSpec",
    "Skipped",
    "SpectrumError",
    "TelemetryConfig",
    "TensorBoardSink",
    "WandbSink",
    "attach",
    "discover",
    "discover_sites",
    "measure_model",
    "scalar_summary",
]
