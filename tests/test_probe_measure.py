"""Post-hoc measurement: measure_model, and `capscale measure` on a HF directory loaded offline."""

import argparse

import numpy as np
import pandas as pd
import pytest
import torch
from test_probe_sites import hf_gpt2, toy

import capscale
from capscale.probe import measure_model
from capscale.spectrum import FrequencyTable

V = 50


def test_measure_model_is_one_full_batch_measurement():
    model = toy()
    model.train()
    batches = [torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    table = FrequencyTable(np.arange(V, 0, -1))
    df = measure_model(model, batches, freq_table=table, step=42)
    assert model.training  # restored
    assert len(df) == 2 * 2 * 4 and set(df.step) == {42}
    assert set(df[df.bucket == "all"].n_samples) == {42}
    # the same as a probe over the same forwards, in eval mode, float64
    model.eval()
    with capscale.attach(model, every=1, freq_table=table, dtype=torch.float64, mode="eval") as probe:
        with torch.no_grad():
            for b in batches:
                model(b)
        ref = probe.compute()
    np.testing.assert_allclose(df.soft_rank, ref.soft_rank, rtol=1e-12)
    with pytest.raises(ValueError, match="no batches"):
        measure_model(model, [])


def test_measure_model_takes_keyword_batches():
    model = hf_gpt2(vocab=V)
    ids = torch.randint(0, V, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    df = measure_model(model, [{"input_ids": ids, "attention_mask": mask}], sites=("post",))
    assert set(df.n_samples) == {13} and set(df.site) == {"post"}


def _hf_dir(tmp_path, text):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(text.split()))
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    d = tmp_path / "model"
    fast.save_pretrained(d)
    hf_gpt2(vocab=len(vocab)).save_pretrained(d)
    return d, len(vocab)


def _args(*argv):
    from capscale import measure

    p = argparse.ArgumentParser()
    measure.add_arguments(p)
    return measure, p.parse_args(argv)


def test_cli_measures_a_hf_directory_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    text = " ".join(rng.choice(words, size=400, p=np.r_[[0.3, 0.2], np.full(28, 0.5 / 28)]))
    model_dir, _ = _hf_dir(tmp_path, text)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(text[: len(text) // 2])
    (data / "b.md").write_text(text[len(text) // 2 :])
    out = tmp_path / "spectra.parquet"
    measure, args = _args(
        str(model_dir), "--data", str(data), "--tokens", "300", "--out", str(out), "--seq-len", "16"
    )
    assert measure.run(args) == 0
    df = pd.read_parquet(out)
    assert len(df) == 2 * 2 * 4
    assert set(df[df.bucket == "all"].n_samples) == {300}
    assert df[df.bucket == "head"].n_samples.sum() > 0 and df.soft_rank.notna().all()
    assert "measured 300 tokens" in capsys.readouterr().out
    # csv output, one layer, one site
    measure, args = _args(
        str(model_dir),
        "--data",
        str(data / "a.txt"),
        "--out",
        str(tmp_path / "x.csv"),
        "--layers",
        "1",
        "--sites",
        "post",
        "--dtype",
        "float32",
    )
    measure.run(args)
    assert len(pd.read_csv(tmp_path / "x.csv")) == 4


def test_cli_errors_are_clear(tmp_path):
    not_hf = tmp_path / "ckpt"
    not_hf.mkdir()
    (tmp_path / "t.txt").write_text("hello world")
    measure, args = _args(
        str(not_hf), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.parquet")
    )
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        measure.run(args)
    model_dir, _ = _hf_dir(tmp_path, "a b c d")
    measure, args = _args(
        str(model_dir), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o.parquet")
    )
    with pytest.raises(FileNotFoundError):
        measure.run(args)
    measure, args = _args(str(model_dir), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.txt"))
    with pytest.raises(ValueError, match=r"\.parquet"):
        measure.run(args)
