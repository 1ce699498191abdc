"""capscale: realized spectral capacity for LLM pretraining.

Layers, each importing only those below it:
``spectrum -> probe -> train -> sweep -> analysis -> report -> cli``;
``capscale.atomic`` (atomic file writes) sits below them all.
Importing ``capscale`` loads only the NumPy core; torch is imported by the
layers that need it.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("capscale")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from capscale import spectrum  # noqa: E402

__all__ = ["SiteSpec", "__version__", "attach", "spectrum"]


def __getattr__(name: str):
    # ``capscale.attach`` (the probe's one-line entry point) and ``SiteSpec`` import torch,
    # so it is loaded on first use and ``import capscale`` stays NumPy-only.
    if name in ("attach", "SiteSpec"):
        import capscale.probe

        return getattr(capscale.probe, name)
    raise AttributeError(f"module 'capscale' has no attribute {name!r}")
