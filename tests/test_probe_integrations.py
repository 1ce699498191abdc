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


def test_hf_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from capscale.probe.integrations.hf import CapscaleCallback

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
        gradient_accumulation_steps=2,
        logging_steps=100,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=hf_gpt2(vocab=V), args=args, train_dataset=Data())
    table = FrequencyTable(np.arange(V, 0, -1))
    cb = CapscaleCallback.add_to(trainer, every=2, freq_table=table, sinks=[ParquetSink(tmp_path / "spectra.parquet")])
    trainer.train()
    df = pd.read_parquet(tmp_path / "spectra.parquet")
    assert sorted(df.step.unique()) == [0, 2, 4]  # every 2 steps and the last (max_steps - 1)
    assert len(df) == 3 * 2 * 2 * 4
    # 2 micro-batches x 2 sequences of 12 tokens, 2 or 3 of them padding (shuffled)
    per = df[(df.layer == 0) & (df.site == "pre") & (df.bucket == "all")].n_samples
    assert set(per) <= set(range(36, 41))  # 48 if padding were counted
    tb = scalars(tmp_path / "out", "train/capscale/pre/all/soft_rank")  # HF's own writer, under output_dir
    assert sorted(tb) == [1, 3, 5]  # logged by HF's TensorBoardCallback at the step after each window
    assert cb.probe is not None and not cb.probe.active


class LitLM:  # built lazily so that importing this module needs no lightning
    @staticmethod
    def make(L):
        class _Lit(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = toy(vocab=V)

            def forward(self, ids):
                return self.model(ids)

            def training_step(self, batch, batch_idx):
                (ids,) = batch
                logits = self(ids)
                return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return _Lit()


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from capscale.probe.integrations.lightning import CapscaleLightningCallback

    ids = torch.randint(0, V, (16, 10), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    cb = CapscaleLightningCallback(every=2, sites=("pre", "post"), sinks=[ParquetSink(tmp_path / "spectra.parquet")])
    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(LitLM.make(L), loader)
    df = pd.read_parquet(tmp_path / "spectra.parquet")
    assert sorted(df.step.unique()) == [0, 2, 3]
    per = df[(df.layer == 0) & (df.site == "post")].set_index("step").n_samples
    assert per.to_dict() == {0: 40, 2: 40, 3: 40}  # 2 micro-batches x 2 x 10 tokens per step
    tb = scalars(tmp_path / "tb", "capscale/post/all/soft_rank")
    assert sorted(tb) == [0, 2, 3]
    assert tb[0] == pytest.approx(df[(df.step == 0) & (df.site == "post")].soft_rank.mean(), rel=1e-6)
