"""capscale.sweep: width × optimizer × seed grids of training runs, resumable executors."""

from capscale.sweep.spec import SWEEP_PRESETS, SweepSpec, load_spec
from capscale.sweep.sweep import run_sweep

__all__ = ["SWEEP_PRESETS", "SweepSpec", "load_spec", "run_sweep"]
