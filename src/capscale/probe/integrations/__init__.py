"""Framework integrations (optional extras): ``hf`` (transformers) and ``lightning``.

Each module imports its framework at import time; importing this package imports neither.
Both callbacks are also ``capscale.HFCallback`` and ``capscale.LightningCallback``.
"""
