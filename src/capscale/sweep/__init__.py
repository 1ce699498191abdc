"""capscale.sweep: width × optimizer × seed grids of training runs, resumable executors."""

from importlib import import_module

__all__ = ["SWEEP_PRESETS", "SweepSpec", "load_spec", "run_sweep"]

# Loaded on first use: ``python -m capscale.sweep.worker`` imports this package before it
# runs the worker as __main__, and an eager import of the worker (through ``sweep``) here
# would load it twice (runpy's "found in sys.modules" warning in every worker.log).
_HOME = {"SWEEP_PRESETS": "spec", "SweepSpec": "spec", "load_spec": "spec", "run_sweep": "sweep"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f"capscale.sweep.{_HOME[name]}"), name)
    raise AttributeError(f"module 'capscale.sweep' has no attribute {name!r}")
