"""Validation loss from any loop: the key read, the warning when none is logged, per-bucket loss, failed HF runs."""

import json
import warnings

import numpy as np
import pytest
import torch
from test_probe_integrations import LitLM, V
from test_probe_sites import hf_gpt2

from capscale.probe.integrations._common import LowSamplesWarning, NoValidationLossWarning
from capscale.rundir import RunDir
from capscale.spectrum import FrequencyTable


def _fit_lightning(tmp_path, val_key, **cb_kw):
    L = pytest.importorskip("lightning.pytorch")
    import capscale

    class Lit(LitLM.make(L).__class__):
        def validation_step(self, batch, batch_idx):
            self.log(val_key, self.loss(batch[0]))

    ids = torch.randint(0, V, (16, 10), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[:4]), batch_size=2)
    cb = capscale.LightningCallback(every=2, out=tmp_path / "run", run_config={"optimizer": "sgd"}, **cb_kw)
    trainer = L.Trainer(
        max_steps=4,
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        val_check_interval=4,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Lit(), loader, val)
    return RunDir(tmp_path / "run"), caught


def test_lightning_val_ce_warns_and_q2_says_not_measured(tmp_path):
    from capscale.report import build_report

    run, caught = _fit_lightning(tmp_path, "val/ce")
    warned = [w for w in caught if issubclass(w.category, NoValidationLossWarning)]
    assert len(warned) == 1 and "val/ce" in str(warned[0].message) and "val_loss_key" in str(warned[0].message)
    assert not any("val_loss" in m for m in run.read_metrics())
    # window=1 step of 2 x 10 tokens at width 64: N/D < 10, and the warning names the fix
    low = [w for w in caught if issubclass(w.category, LowSamplesWarning)]
    assert len(low) == 1 and "window=" in str(low[0].message)
    data = json.loads(build_report(tmp_path / "run", n_resamples=100).json.read_text(encoding="utf-8"))
    q2 = data["answers"][1]
    assert q2["verdict"] == "not measured" and "Validation loss not measured" in q2["finding"]
    # the report names the same fix for the undersampled windows
    (reliability,) = [f for f in data["summary"]["findings"] if f.startswith("Reliability")]
    assert "window=" in reliability and "longer" in reliability


def test_lightning_reads_the_given_key_and_computes_per_bucket_loss(tmp_path):
    table = FrequencyTable(np.arange(V, 0, -1))
    run, caught = _fit_lightning(tmp_path, "val/ce", val_loss_key="val/ce", freq_table=table)
    assert not any(issubclass(w.category, NoValidationLossWarning) for w in caught)
    (rec,) = [m for m in run.read_metrics() if "val_loss" in m]
    assert rec["step"] == 4 and rec["val_loss"] > 0
    parts = [rec[f"val_loss_{b}"] for b in ("head", "mid", "tail")]
    assert all(p > 0 for p in parts)
    # the buckets partition the target tokens: their losses bracket the overall loss
    assert min(parts) <= rec["val_loss"] <= max(parts)


def test_hf_run_that_raises_ends_failed(tmp_path):
    transformers = pytest.importorskip("transformers")
    import capscale

    rows = [torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    model = hf_gpt2(vocab=V)
    forward, calls = model.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted failure")
        return forward(*args, **kwargs)

    model.forward = failing_forward
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=5,
        per_device_train_batch_size=2,
        report_to=[],
        remove_unused_columns=False,  # the wrapped forward hides its signature
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    cb = capscale.HFCallback(every=1, out=tmp_path / "run", run_config={"optimizer": "adamw"})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    with pytest.raises(RuntimeError, match="planted failure"):
        trainer.train()
    status = RunDir(tmp_path / "run").read_status()
    assert status["status"] == "failed" and "planted failure" in status["reason"]


def test_hf_add_to_marks_a_failure_anywhere_in_train_failed(tmp_path):
    """A failure outside the training step (here a callback's on_step_end) ends the run failed
    when the callback was added with ``HFCallback.add_to``, which wraps the whole ``train()``."""
    transformers = pytest.importorskip("transformers")
    import capscale

    rows = [torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]

    class Planted(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("planted at step end")

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=5,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=hf_gpt2(vocab=V), args=args, train_dataset=data, callbacks=[Planted()])
    capscale.HFCallback.add_to(trainer, every=1, out=tmp_path / "run", run_config={"optimizer": "adamw"})
    with pytest.raises(RuntimeError, match="planted at step end"):
        trainer.train()
    status = RunDir(tmp_path / "run").read_status()
    assert status["status"] == "failed" and "planted at step end" in status["reason"]
