"""Post-hoc measurement: one full-batch spectrum per site of a trained model on given data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
import torch
from torch import nn

from capscale.probe.probe import attach
from capscale.probe.sites import SITE_NAMES
from capscale.spectrum import FrequencyTable


def measure_model(
    model: nn.Module,
    batches: Iterable,
    *,
    freq_table: FrequencyTable | None = None,
    sites=SITE_NAMES,
    layers="auto",
    dtype=torch.float64,
    device=None,
    step: int = 0,
) -> pd.DataFrame:
    """Spectra of every (layer, site, bucket) over all ``batches``, as one measurement labelled ``step``.

    ``batches``: token-id tensors (passed as the model's first argument) or
    mappings of keyword arguments (e.g. ``{"input_ids": ..., "attention_mask": ...}``).
    The model runs in eval mode under ``torch.no_grad`` (its mode is restored);
    GEMMs default to float64: post-hoc, precision is worth more than speed.
    """
    was_training = model.training
    model.eval()
    try:
        with (
            attach(
                model,
                sites=sites,
                layers=layers,
                freq_table=freq_table,
                every=1,
                window=1,
                dtype=dtype,
                device=device,
                mode="any",
                start_step=step,
            ) as probe,
            torch.no_grad(),
        ):
            n = 0
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**batch)
                else:
                    model(batch)
                n += 1
            if n == 0:
                raise ValueError("measure_model: no batches to measure")
            return probe.compute()
    finally:
        model.train(was_training)
