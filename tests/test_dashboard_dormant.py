"""The dormant-unit fraction reaches the dashboards (TensorBoard, W&B, Lightning loggers)."""

import pytest
import torch
from test_probe_sites import hf_gpt2

from capscale.probe import measure_model
from capscale.probe.dashboard import dashboard_scalars

DEAD = [0, 3, 4, 10, 33, 63]  # of 64 FFN units in layer 1


def _measured():
    model = hf_gpt2(vocab=50, layers=2, d=16)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[:, DEAD] = 0.0  # a constant pre-activation: dead units
        model.transformer.h[1].mlp.c_fc.bias[DEAD] = -1.0
    batches = [torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return measure_model(model, batches)


def test_dashboard_shows_planted_dead_units_per_layer_and_median():
    s = dashboard_scalars(_measured())
    for site in ("pre", "post"):
        assert s[f"capscale/dormant_frac/layer01/{site}"] == len(DEAD) / 64
        assert s[f"capscale/dormant_frac/layer00/{site}"] == 0.0
        assert s[f"capscale/dormant_frac/median/{site}"] == pytest.approx(len(DEAD) / 64 / 2)


def test_rows_without_the_column_still_give_the_ranks():
    df = _measured().drop(columns="dormant_frac")  # spectra written before the column existed
    s = dashboard_scalars(df)
    assert not [k for k in s if "dormant" in k]
    assert s["capscale/hard_rank/layer01/post"] > 1


def test_tensorboard_logs_dormant_frac(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from capscale.probe import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb")
    sink.write_spectra(_measured())
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Scalars("capscale/dormant_frac/layer01/post")[0].value == pytest.approx(len(DEAD) / 64)
