"""`capscale measure` on saved tiny Hugging Face directories of any family, and its bad-input table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from capscale.cli import main

T = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(40)]


def _text(n=300, seed=0):
    rng = np.random.default_rng(seed)
    p = np.r_[[0.3, 0.2], np.full(38, 0.5 / 38)]
    return " ".join(rng.choice(WORDS, size=n, p=p))


def _word_tokenizer(kind: str):
    """A word-level fast tokenizer; 'bert' frames [CLS] … [SEP], 't5' appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return T.PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 5)])
        return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


V = 6 + len(WORDS)


def _model(kind: str, seed=0):
    torch.manual_seed(seed)
    if kind == "opt":
        cfg = T.OPTConfig(
            vocab_size=V,
            hidden_size=16,
            ffn_dim=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            pad_token_id=0,
            bos_token_id=5,
            eos_token_id=5,
        )
        return T.OPTForCausalLM(cfg)
    if kind == "t5":
        cfg = T.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=40, num_layers=2, num_heads=2, decoder_start_token_id=0)
        return T.T5ForConditionalGeneration(cfg)
    cfg = T.BertConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return T.BertForMaskedLM(cfg) if kind == "bert" else T.BertModel(cfg)


def _save(tmp_path, kind: str, name=None, seed=0):
    d = tmp_path / (name or kind)
    _model(kind, seed).save_pretrained(d)
    _word_tokenizer({"embed": "bert"}.get(kind, kind)).save_pretrained(d)
    if kind == "embed":  # what sentence-transformers adds beside the BertModel
        (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "Transformer"}]))
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return d


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    text = _text()
    (d / "part1").write_text(text[: len(text) // 2])  # extension-less text files are read
    (d / "part2.txt").write_text(text[len(text) // 2 :])
    (d / "skip.json").write_text("{}")  # not text: ignored
    return d


def _run(capfd, *argv):
    capfd.readouterr()  # what came before (saving the models) is not the command's
    code = main(["measure", *map(str, argv)])
    out, err = capfd.readouterr()
    return code, out, err


def _own_hard_ranks(model, seqs, names):
    """Hard rank of each named module's output (pre) / input (post), from this test's own hooks, float64."""
    got = {}
    hooks = []
    for key, (path, capture) in names.items():
        mod = model.get_submodule(path)
        if capture == "output":
            hooks.append(mod.register_forward_hook(lambda m, a, o, k=key: got.setdefault(k, []).append(o)))
        else:
            hooks.append(mod.register_forward_pre_hook(lambda m, a, k=key: got.setdefault(k, []).append(a[0])))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    for h in hooks:
        h.remove()
    out = {}
    for k, xs in got.items():
        x = torch.cat([t.double().reshape(-1, t.shape[-1]) for t in xs]).numpy()
        lam = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 1e-12, None)
        out[k] = lam.sum() ** 2 / (lam**2).sum()
    return out


@pytest.mark.parametrize("kind", ["opt", "t5", "bert", "embed"])
def test_measure_saved_directories_end_to_end(tmp_path, data, capfd, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = _save(tmp_path, kind)
    out = tmp_path / "spectra.parquet"
    code, stdout, err = _run(capfd, d, "--data", data, "--tokens", "120", "--seq-len", "16", "--out", out)
    assert code == 0, err
    assert "newly initialized" not in err and "Traceback" not in err
    df = pd.read_parquet(out)
    assert set(df["model"]) == {str(d)}
    stacks = ["encoder", "decoder"] if kind == "t5" else [""]
    keys = {(s, layer, site) for s in stacks for layer in (0, 1) for site in ("pre", "post")}
    allb = df[df.bucket == "all"]
    assert set(zip(allb["stack"], allb.layer, allb.site)) == keys and len(allb) == len(keys)
    assert allb.soft_rank.notna().all()
    n_special = {"opt": 0, "t5": 1, "bert": 2, "embed": 2}[kind]
    n_seqs = -(-120 // (16 - n_special))
    assert set(allb.n_samples) == {120 + n_seqs * n_special}
    if kind in ("bert", "embed"):
        # [CLS] … [SEP] framing and the class it was saved as: the same ranks as the test's own
        # forward of tokenizer(chunk) through the saved model, hooked where a person would hook it
        cls = T.BertForMaskedLM if kind == "bert" else T.BertModel
        model = cls.from_pretrained(d).eval()
        tok = T.PreTrainedTokenizerFast.from_pretrained(d)
        text = (data / "part1").read_text() + (data / "part2.txt").read_text()
        ids = tok((data / "part1").read_text(), add_special_tokens=False)["input_ids"]
        ids += tok((data / "part2.txt").read_text(), add_special_tokens=False)["input_ids"]
        assert len(ids) >= 120 and len(text) > 0
        ids = ids[:120]
        seqs = [[tok.cls_token_id, *ids[i : i + 14], tok.sep_token_id] for i in range(0, 120, 14)]
        assert seqs[0][0] == tok.cls_token_id and seqs[0][-1] == tok.sep_token_id
        base = "bert." if kind == "bert" else ""
        names = {(layer, "pre"): (f"{base}encoder.layer.{layer}.intermediate.dense", "output") for layer in (0, 1)} | {
            (layer, "post"): (f"{base}encoder.layer.{layer}.output.dense", "input") for layer in (0, 1)
        }
        own = _own_hard_ranks(model, seqs, names)
        for (layer, site), hard in own.items():
            row = allb[(allb.layer == layer) & (allb.site == site)].iloc[0]
            np.testing.assert_allclose(row.hard_rank, hard, rtol=1e-6)


def test_head_weights_absent_loads_the_base_model(tmp_path, data, capfd):
    """A BertModel saved under a *ForMaskedLM name: measured as the base model, no random head."""
    d = _save(tmp_path, "embed")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run(capfd, d, "--data", data, "--tokens", "60", "--out", tmp_path / "o.csv")
    assert code == 0, err
    assert "newly initialized" not in err and "not initialized" not in err
    df = pd.read_csv(tmp_path / "o.csv")
    assert set(df.module.str.split(".").str[0]) == {"encoder"}  # BertModel's names, no "bert." prefix


def test_explicit_sites_and_a_series_of_checkpoints(tmp_path, data, capfd):
    bert = _save(tmp_path, "embed", "bert")
    out_auto, out_named = tmp_path / "auto.parquet", tmp_path / "named.parquet"
    assert _run(capfd, bert, "--data", data, "--tokens", "80", "--out", out_auto)[0] == 0
    code, _, err = _run(
        capfd,
        bert,
        "--data",
        data,
        "--tokens",
        "80",
        "--out",
        out_named,
        "--site",
        "pre=encoder.layer.{layer}.intermediate.dense",
        "--site",
        "post=encoder.layer.{layer}.output.dense:input",
    )
    assert code == 0, err
    a, b = pd.read_parquet(out_auto), pd.read_parquet(out_named)
    np.testing.assert_allclose(a.hard_rank, b.hard_rank, rtol=1e-12)
    # a directory of revisions (checkpoint-N) and a plain directory: one table, a model column
    revs = tmp_path / "run"
    revs.mkdir()
    for step, seed in ((200, 1), (1000, 2)):
        _save(revs, "opt", f"checkpoint-{step}", seed=seed)
    opt = _save(tmp_path, "opt")
    out = tmp_path / "series.jsonl"
    code, stdout, err = _run(capfd, revs, opt, "--data", data, "--tokens", "64", "--out", out)
    assert code == 0, err
    df = pd.read_json(out, lines=True)
    models = list(dict.fromkeys(df["model"]))
    assert models == [str(revs / "checkpoint-200"), str(revs / "checkpoint-1000"), str(opt)]
    assert df.groupby("model", sort=False).step.first().tolist() == [200, 1000, 0]
    assert len(df) == 3 * 2 * 2 * 4
    first = df[df["model"] == models[0]].hard_rank.to_numpy()
    assert not np.allclose(first, df[df["model"] == models[1]].hard_rank.to_numpy())


def _bad_cases(tmp_path, data, opt):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    (tmp_path / "table.json").write_text("{not json")
    bad_dir = tmp_path / "baddir"
    bad_dir.mkdir()
    (bad_dir / "a.txt").write_text("fine")
    (bad_dir / "notes").write_bytes("\xe9t\xe9".encode("latin-1"))
    base = [opt, "--out", tmp_path / "o.parquet"]
    cases = {
        "binary data": ([*base, "--data", tmp_path / "bin.txt"], "is binary"),
        "latin-1 data": ([*base, "--data", tmp_path / "latin1.txt"], "latin1.txt' is not UTF-8"),
        "latin-1 file in a directory": ([*base, "--data", bad_dir], "notes' is not UTF-8"),
        "missing data": ([*base, "--data", tmp_path / "nope"], "does not exist"),
        "seq-len 0": ([*base, "--data", data, "--seq-len", "0"], "--seq-len must be >= 2"),
        "tokens 1": ([*base, "--data", data, "--tokens", "1"], "--tokens must be >= 2"),
        "device bogus": ([*base, "--data", data, "--device", "bogus"], "'bogus' is not a torch device"),
        "site syntax": ([*base, "--data", data, "--site", "middle=x.{layer}"], "expected pre=PATTERN"),
        "site without layer": ([*base, "--data", data, "--site", "pre=encoder.fc"], "must contain {layer}"),
        "sites name": ([*base, "--data", data, "--sites", "pre,middle"], "sites are pre, post"),
        "layers": ([*base, "--data", data, "--layers", "one"], "--layers 'one'"),
        "freq table": ([*base, "--data", data, "--freq-table", tmp_path / "table.json"], "table.json"),
        "no data for HF": (base, "--data is needed"),
        "missing model": ([tmp_path / "none", "--out", tmp_path / "o.parquet", "--data", data], "does not exist"),
        "output suffix": ([opt, "--out", tmp_path / "o.txt", "--data", data], ".parquet"),
    }
    if not torch.cuda.is_available():
        cases["device cuda without CUDA"] = ([*base, "--data", data, "--device", "cuda"], "no CUDA device")
    return cases


def test_bad_input_is_one_line_before_any_model_is_loaded(tmp_path, data, capfd, monkeypatch):
    import capscale.measure

    opt = _save(tmp_path, "opt")
    monkeypatch.setattr(capscale.measure, "load_model", lambda *a: pytest.fail("a model was loaded"))
    for name, (argv, needle) in _bad_cases(tmp_path, data, opt).items():
        code, out, err = _run(capfd, *argv)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("capscale measure: error:"), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert not (tmp_path / "o.parquet").exists(), name


def test_unloadable_weights_and_configs_are_one_line(tmp_path, data, capfd):
    opt = _save(tmp_path, "opt")
    # an HF .bin that torch.load(weights_only=True) refuses (a pickled non-tensor object)
    (opt / "model.safetensors").unlink()
    torch.save({"model.decoder.embed_tokens.weight": np.arange(3)}, opt / "pytorch_model.bin")
    code, _, err = _run(capfd, opt, "--data", data, "--out", tmp_path / "o.parquet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot load the model" in lines[0] and str(opt) in lines[0], err
    (opt / "config.json").write_text("{not json")
    code, _, err = _run(capfd, opt, "--data", data, "--out", tmp_path / "o.parquet")
    assert code == 2 and "config.json' is not readable JSON" in err and len(err.strip().splitlines()) == 1


def test_a_model_that_reads_no_tokens_is_one_line(tmp_path, data, capfd):
    torch.manual_seed(0)
    cfg = T.WhisperConfig(
        vocab_size=V,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=40,
        decoder_ffn_dim=40,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    d = tmp_path / "whisper"
    T.WhisperForConditionalGeneration(cfg).save_pretrained(d)
    _word_tokenizer("t5").save_pretrained(d)
    code, _, err = _run(capfd, d, "--data", data, "--out", tmp_path / "o.parquet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "reads input_features, not token ids" in lines[0], err


# -- issue 30, item 9: more tracebacks become one line ------------------------------------


@pytest.mark.parametrize("arch", [["logging"], ["AutoConfig"], "OPTForCausalLM", [["nested"]]])
def test_an_architectures_entry_that_is_no_model_class_falls_back_to_automodel(tmp_path, data, capfd, arch):
    opt = _save(tmp_path, "opt")
    cfg = json.loads((opt / "config.json").read_text())
    cfg["architectures"] = arch
    (opt / "config.json").write_text(json.dumps(cfg))
    code, out, err = _run(capfd, opt, "--data", data, "--out", tmp_path / "o.parquet")
    assert code == 0, err
    assert "measured" in out


def test_a_checkpoint_holding_a_pickle_payload_is_one_line_and_does_not_run(tmp_path, capfd):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "optimizer": {"name": "adamw"}, "train": {}}))
    marker = tmp_path / "ran"
    torch.save({"model": _Payload(str(marker))}, run / "checkpoints" / "step_00000010.pt")
    code, _, err = _run(capfd, run, "--out", tmp_path / "o.parquet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "holds pickled objects, not only tensors (io.open): refused unread" in lines[0]
    assert not marker.exists()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # what a hostile checkpoint would run on a plain torch.load
        return (open, (self.path, "w"))


def test_the_meta_device_is_one_line(tmp_path, data, capfd):
    opt = _save(tmp_path, "opt")
    code, _, err = _run(capfd, opt, "--data", data, "--device", "meta", "--out", tmp_path / "o.parquet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--device 'meta' holds no weights" in lines[0], err
    assert not (tmp_path / "o.parquet").exists()
