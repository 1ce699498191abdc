"""Post-hoc measurement: measure_model, and `capscale measure` on capscale checkpoints and HF directories."""

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
    measure, args = _args(str(model_dir), "--data", str(data), "--tokens", "300", "--out", str(out), "--seq-len", "16")
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
    measure, args = _args(str(not_hf), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.parquet"))
    with pytest.raises(ValueError, match="nor a Hugging Face model directory"):
        measure.run(args)
    model_dir, _ = _hf_dir(tmp_path, "a b c d")
    measure, args = _args(str(model_dir), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o.parquet"))
    with pytest.raises(FileNotFoundError):
        measure.run(args)
    measure, args = _args(str(model_dir), "--out", str(tmp_path / "o.parquet"))
    with pytest.raises(ValueError, match="--data is needed"):
        measure.run(args)
    measure, args = _args(str(model_dir), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.txt"))
    with pytest.raises(ValueError, match=r"\.parquet"):
        measure.run(args)


def _capscale_run(tmp_path, run_name="run", ffn_width=None):
    """A 4-step run of our GPT on a local text with byte-level BPE, checkpointed at steps 2 and 4."""
    from capscale.train.config import resolve
    from capscale.train.loop import train

    rng = np.random.default_rng(1)
    words = [f"tok{i} " for i in range(40)]
    docs = tmp_path / "corpus"
    docs.mkdir(exist_ok=True)
    for k in range(3):
        (docs / f"d{k}.txt").write_text("".join(rng.choice(words, size=1500)))
    cfg = resolve(
        "smoke",
        overrides={
            "data.source": f"text:{docs}",
            "data.tokenizer": "bytebpe:300",
            "data.max_tokens": None,
            "train.steps": 4,
            "train.checkpoint_every": 2,
            "train.keep_checkpoints": 2,
            "train.eval_every": 4,
            "telemetry.enabled": False,
            **({"model.ffn_width": ffn_width, "model.ffn_mult": None} if ffn_width else {}),
        },
    )
    run = tmp_path / run_name
    assert train(cfg, run, log=lambda _m: None)["status"] == "done"
    return run, docs


def test_cli_measures_a_capscale_run_and_checkpoint(tmp_path, monkeypatch):
    import json

    from capscale.train.checkpoint import list_checkpoints
    from capscale.train.config import RunConfig
    from capscale.train.data import load_data
    from capscale.train.model import GPT, GPTConfig

    monkeypatch.setenv("CAPSCALE_HOME", str(tmp_path / "home"))  # tokenizer and shard caches
    run, docs = _capscale_run(tmp_path)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 4]
    out = tmp_path / "post.parquet"
    measure, args = _args(str(run), "--data", str(docs / "d0.txt"), "--tokens", "200", "--out", str(out))
    assert measure.run(args) == 0
    df = pd.read_parquet(out)
    assert set(df.step) == {4}  # the latest checkpoint's step
    assert len(df) == 2 * 2 * 4 and set(df[df.bucket == "all"].n_samples) == {200}

    # Independently: the step-4 weights, the run's tokenizer, and hooks on the MLP's
    # own modules; float64 covariance of the captured rows.
    config = json.loads((run / "config.json").read_text())
    model = GPT(GPTConfig.from_dict(config["model"]))
    model.load_state_dict(torch.load(ckpts[-1][1], weights_only=True)["model"])
    model.eval()
    config.pop("versions")
    split = load_data(RunConfig.from_dict(config).data)
    tok = split.tokenizer
    ids = (tok.encode((docs / "d0.txt").read_text()) + [tok.eot_id])[:200]
    seq = 32  # the model's context (smoke preset), the CLI's default --seq-len here
    got = {}

    def keep(name):
        return lambda mod, inp, outp: got.setdefault(name, []).append(
            outp.detach().double().reshape(-1, outp.shape[-1])
        )

    hooks = [model.blocks[i].mlp.c_fc.register_forward_hook(keep(i)) for i in range(2)]
    with torch.no_grad():
        t = torch.tensor(ids)
        n = len(ids) // seq
        model(t[: n * seq].view(n, seq))
        model(t[n * seq :].view(1, -1))
    for h in hooks:
        h.remove()
    for layer in range(2):
        x = torch.cat(got[layer]).numpy()
        lam = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 0, None)
        hard = lam.sum() ** 2 / (lam**2).sum()
        row = df[(df.layer == layer) & (df.site == "pre") & (df.bucket == "all")].iloc[0]
        np.testing.assert_allclose(row.hard_rank, hard, rtol=1e-6)

    # one checkpoint file, the earlier one: other weights, its own step
    out2 = tmp_path / "early.jsonl"
    measure, args = _args(str(ckpts[0][1]), "--data", str(docs / "d0.txt"), "--tokens", "200", "--out", str(out2))
    measure.run(args)
    early = pd.read_json(out2, lines=True)
    assert set(early.step) == {2}
    assert not np.allclose(early.soft_rank.to_numpy(), df.soft_rank.to_numpy())
    # no --data: the run's own validation split, bucketed by its training table
    out3 = tmp_path / "held.parquet"
    measure, args = _args(str(run), "--tokens", "150", "--out", str(out3))
    measure.run(args)
    held = pd.read_parquet(out3)
    one = held[(held.layer == 0) & (held.site == "post")].set_index("bucket").n_samples
    val = torch.as_tensor(np.asarray(split.val_tokens[:150], dtype=np.int64))
    per_bucket = torch.bincount(split.frequency_table().bucket(val).long(), minlength=3).tolist()
    assert one["all"] == 150 and [one["head"], one["mid"], one["tail"]] == per_bucket
    # the run's checkpoints/ directory: every checkpoint into one table, in step order
    out4 = tmp_path / "series.csv"
    measure, args = _args(
        str(run / "checkpoints"), "--data", str(docs / "d0.txt"), "--tokens", "200", "--out", str(out4)
    )
    measure.run(args)
    series = pd.read_csv(out4)
    assert list(dict.fromkeys(series["model"])) == [str(p) for _, p in ckpts]
    assert series.groupby("model", sort=False).step.first().tolist() == [2, 4]
    np.testing.assert_allclose(series[series.step == 4].soft_rank.to_numpy(), df.soft_rank.to_numpy(), rtol=1e-12)
    # a context longer than the model's is refused, before any work
    measure, args = _args(str(run), "--data", str(docs), "--out", str(out), "--seq-len", "64")
    with pytest.raises(ValueError, match="context of 32"):
        measure.run(args)


def test_posthoc_script_measures_each_finished_run_once_and_fits_widths(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setenv("CAPSCALE_HOME", str(tmp_path / "home"))
    for w in (32, 64, 128):
        _capscale_run(tmp_path, f"sweep/runs/adamw_w{w}_s0", ffn_width=w)
    path = Path(__file__).parents[1] / "scripts" / "posthoc_ranks.py"
    spec = importlib.util.spec_from_file_location("posthoc_ranks", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, betas = tmp_path / "ranks.csv", tmp_path / "betas.csv"
    argv = ["posthoc_ranks.py", str(tmp_path / "sweep"), "--tokens", "256", "--out", str(out), "--betas", str(betas)]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    ranks = pd.read_csv(out)
    assert len(ranks) == 3 * 2 * 4 and set(ranks.width) == {32, 64, 128} and set(ranks.series) == {"adamw"}
    assert set(ranks.step) == {4} and set(ranks[ranks.bucket == "all"].n_samples) == {256}
    # the median over layers of what `capscale measure` gives for that run
    measure, args = _args(
        str(tmp_path / "sweep/runs/adamw_w64_s0"),
        "--tokens",
        "256",
        "--dtype",
        "float32",
        "--out",
        str(tmp_path / "one.parquet"),
    )
    measure.run(args)
    one = pd.read_parquet(tmp_path / "one.parquet")
    want = one[(one.site == "post") & (one.bucket == "tail")].hard_rank.median()
    got = ranks[(ranks.width == 64) & (ranks.site == "post") & (ranks.bucket == "tail")].hard_rank.item()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    fits = pd.read_csv(betas)
    assert len(fits) == 2 * 4 * 2 and (fits.n == 3).all() and fits.beta.notna().all()
    # a second pass reuses what it measured
    monkeypatch.setattr(script, "measure_run", lambda *a: (_ for _ in ()).throw(AssertionError("re-measured")))
    script.main()
