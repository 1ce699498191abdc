"""capscale: realized spectral capacity for LLM pretraining.

Layers, each importing only those below it:
``spectrum -> probe -> train -> sweep -> analysis -> report -> cli``;
``capscale.atomic`` (atomic file writes) sits below them all.
Importing ``capscale`` loads nothing heavy (``capscale --help`` answers at once);
``capscale.spectrum`` loads NumPy and SciPy on first use, and torch is imported
only by the layers that need it.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("capscale")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["HFCallback", "LightningCallback", "SiteSpec", "__version__", "attach", "spectrum"]

# Loaded on first use, so that ``import capscale`` stays NumPy-only: ``attach``
# and ``SiteSpec`` import torch, the callbacks their frameworks.
_LAZY = {
    "attach": ("capscale.probe", "attach"),
    "SiteSpec": ("capscale.probe", "SiteSpec"),
    "HFCallback": ("capscale.probe.integrations.hf", "HFCallback"),
    "LightningCallback": ("capscale.probe.integrations.lightning", "LightningCallback"),
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    if name == "spectrum":
        from importlib import import_module

        return import_module("capscale.spectrum")
    raise AttributeError(f"module 'capscale' has no attribute {name!r}")
