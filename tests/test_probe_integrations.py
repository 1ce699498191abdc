"""HF Trainer and Lightning callbacks: a few real training steps, TensorBoard events and Parquet rows."""

import numpy as np
import pandas as pd
import pytest
import torch
from test_probe_sites import hf_gpt2, toy

from capscale.probe import ParquetSink
from capscale.spectrum import FrequencyTable

V = 64


def scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for d in [logdir, *[p for p in logdir.rglob("*") if p.is_dir()]]:
        acc = EventAccumulator(str(d))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_hf_trainer_callback(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import capscale
    from capscale.rundir import RunDir

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, V, (12,), generator=g) for _ in range(12)]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            mask = torch.ones(12, dtype=torch.long)
            mask[9 + i % 2 :] = 0  # right padding: 3 or 2 pad tokens
            return {"input_ids": rows[i], "attention_mask": mask, "labels": rows[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=5,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=5,
        report_to=["tensorboard", "wandb"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    table = FrequencyTable(np.arange(V, 0, -1))
    cb = capscale.HFCallback(
        every=2,
        freq_table=table,
        sinks=[ParquetSink(tmp_path / "spectra.parquet")],
        out=tmp_path / "run",
        run_config={"optimizer": "adamw", "seed": 0},
    )
    # passed the standard way: after the trainer's own reporting callbacks
    trainer = transformers.Trainer(
        model=hf_gpt2(vocab=V), args=args, train_dataset=Data(), eval_dataset=Data(), callbacks=[cb]
    )
    trainer.train()
    summary = dict(wandb.run.summary) if wandb.run is not None else {}
    if wandb.run is not None:
        wandb.run.finish()
    df = pd.read_parquet(tmp_path / "spectra.parquet")
    assert sorted(df.step.unique()) == [0, 2, 4]  # every 2 steps and the last (max_steps - 1)
    assert len(df) == 3 * 2 * 2 * 4
    # 2 micro-batches x 2 sequences of 12 tokens, 2 or 3 of them padding (shuffled)
    per = df[(df.layer == 0) & (df.site == "pre") & (df.bucket == "all")].n_samples
    assert set(per) <= set(range(36, 41))  # 48 if padding were counted
    tb = scalars(tmp_path / "out", "capscale/soft_rank/median/pre")  # HF's own writer, under output_dir
    assert sorted(tb) == [0, 2, 4]  # at the measured steps, not the step after
    at0 = df[(df.step == 0) & (df.bucket == "all") & (df.site == "pre")]
    assert tb[0] == pytest.approx(at0.soft_rank.median(), rel=1e-6)
    assert sorted(scalars(tmp_path / "out", "capscale/hard_rank/layer01/post")) == [0, 2, 4]
    assert sorted(scalars(tmp_path / "out", "train/loss")) == [1, 2, 3, 4, 5]  # HF's own, untouched
    # W&B (the trainer's own run): the last measurement on capscale's step axis
    assert summary["capscale/step"] == 4 and summary["capscale/hard_rank/layer01/post"] > 1
    assert summary["capscale/eigenvalues/layer00/pre"]["_type"] == "histogram"
    # readable after training: the DataFrame and the run directory
    assert cb.probe is not None and not cb.probe.active
    pd.testing.assert_frame_equal(cb.probe.compute(reset=False), df, check_dtype=False)
    run = RunDir(tmp_path / "run")
    assert run.read_status()["status"] == "done" and run.read_status()["step"] == 5
    assert run.read_config()["train"] == {"seed": 0, "steps": 5}
    assert len(run.read_spectra()) == len(df)
    metrics = {m["step"]: m for m in run.read_metrics()}
    assert sorted(metrics) == [1, 2, 3, 4, 5] and all(m["loss"] > 0 for m in metrics.values())
    assert metrics[5]["val_loss"] == pytest.approx(trainer.state.log_history[-2]["eval_loss"])


class LitLM:  # built lazily so that importing this module needs no lightning
    @staticmethod
    def make(L):
        class _Lit(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = toy(vocab=V)

            def forward(self, ids):
                return self.model(ids)

            def loss(self, ids):
                logits = self.model(ids)  # Lightning's usual pattern: self.model(...), not self(...)
                return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

            def training_step(self, batch, batch_idx):
                return self.loss(batch[0])

            def validation_step(self, batch, batch_idx):
                self.log("val_loss", self.loss(batch[0]))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return _Lit()


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    import capscale
    from capscale.rundir import RunDir

    ids = torch.randint(0, V, (16, 10), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[:4]), batch_size=2)
    cb = capscale.LightningCallback(
        every=2,
        sites=("pre", "post"),
        sinks=[ParquetSink(tmp_path / "spectra.parquet")],
        out=tmp_path / "run",
        run_config={"optimizer": "sgd"},
    )
    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        logger=[logger, L.loggers.CSVLogger(str(tmp_path), name="csv", version=0)],
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        val_check_interval=4,
    )
    trainer.fit(LitLM.make(L), loader, val)
    df = pd.read_parquet(tmp_path / "spectra.parquet")
    assert sorted(df.step.unique()) == [0, 2, 3]
    per = df[(df.layer == 0) & (df.site == "post")].set_index("step").n_samples
    assert per.to_dict() == {0: 40, 2: 40, 3: 40}  # 2 micro-batches x 2 x 10 tokens per step
    tb = scalars(tmp_path / "tb", "capscale/soft_rank/median/post")
    assert sorted(tb) == [0, 2, 3]
    assert tb[0] == pytest.approx(df[(df.step == 0) & (df.site == "post")].soft_rank.median(), rel=1e-6)
    assert sorted(scalars(tmp_path / "tb", "capscale/hard_rank_per_width/layer00/pre")) == [0, 2, 3]
    csv = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")  # any other logger: log_metrics
    csv = csv.dropna(subset=["capscale/soft_rank/median/post"]).set_index("step")
    assert sorted(csv.index) == [0, 2, 3]
    assert csv.loc[0, "capscale/soft_rank/median/post"] == pytest.approx(tb[0], rel=1e-5)
    run = RunDir(tmp_path / "run")
    assert run.read_status() == {"status": "done", "step": 4, "reason": None}
    metrics = {m["step"]: m for m in run.read_metrics()}
    assert sorted(metrics) == [1, 2, 3, 4] and all(m["loss"] > 0 for m in metrics.values())
    assert metrics[2]["val_loss"] > 0 and metrics[4]["val_loss"] > 0  # every 4 batches = 2 optimizer steps
