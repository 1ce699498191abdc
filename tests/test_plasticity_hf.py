"""capscale plasticity on a Hugging Face model directory: a tiny GPT-2 saved here, continued with a fresh AdamW."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from capscale.cli import main

T = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(30)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("hfplast")
    d = root / "tiny-gpt2"
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=2 + len(WORDS), n_positions=32, n_embd=16, n_layer=2, n_head=2, eos_token_id=1)
    T.GPT2LMHeadModel(cfg).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    rng = np.random.default_rng(0)
    # original domain: random words; second domain: a regular cycle, quickly learnable
    (root / "orig.txt").write_text(" ".join(rng.choice(WORDS, 4000)))
    (root / "new.txt").write_text("\n".join(" ".join(WORDS[(k + i) % 7] for i in range(12)) for k in range(400)))
    return root, d


def test_hf_directory_is_continued_with_a_stated_optimizer(hf_dir, capsys):
    root, d = hf_dir
    out = root / "cont"
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    args = ["plasticity", str(d), "--data", f"text:{root / 'new.txt'}", "--orig-data", f"text:{root / 'orig.txt'}"]
    args += ["--steps", "6", "--eval-every", "3", "--out", str(out), "--lr", "3e-3", "--seq-len", "16"]
    assert main([*args, "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "AdamW, fresh state" in printed and "tiny-gpt2" in printed
    run = out / "runs" / "tiny-gpt2"
    s = json.loads((run / "plasticity.json").read_text())
    assert s["kind"] == "huggingface" and s["label"] == "gpt2" and s["ffn_width"] == 64
    assert "lr 0.003 constant" in s["optimizer"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 3, 6]
    new = [m["val_loss"] for m in metrics]
    assert s["adaptation"] == pytest.approx(new[0] - new[-1]) and s["adaptation"] > 0  # a regular domain is learnt
    assert s["auc_new"] == pytest.approx((new[0] / 2 + new[1] + new[2] / 2) / 2)
    assert s["forgetting"] == pytest.approx(metrics[-1]["val_loss_orig"] - metrics[0]["val_loss_orig"])
    cap = pd.read_parquet(run / "plasticity_spectra.parquet")
    assert set(cap.step) == {0, 6} and cap.dormant_frac.notna().all()
    post = cap[(cap.site == "post") & (cap.bucket == "all")].groupby("step").hard_rank.median()
    assert s["post_hard_rank_0"] == pytest.approx(post[0]) and s["d_post_hard_rank"] == pytest.approx(post[6] - post[0])
    windows = pd.read_parquet(run / "spectra.parquet")  # telemetry on during the continuation
    assert windows.step.nunique() >= 2 and set(windows.site) == {"pre", "post"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["plasticity"]["kind"] == "huggingface" and cfg["optimizer"]["state"] == "fresh"
    # the saved directory itself is not touched
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files


def test_without_the_original_corpus_forgetting_is_not_measured(hf_dir, capsys):
    root, d = hf_dir
    out = root / "cont2"
    args = ["plasticity", str(d), "--data", f"text:{root / 'new.txt'}", "--steps", "2", "--out", str(out)]
    assert main([*args, "--seq-len", "16", "--batch-size", "2"]) == 0
    assert "forgetting: not measured" in capsys.readouterr().out
    s = json.loads((out / "runs" / "tiny-gpt2" / "plasticity.json").read_text())
    assert s["forgetting"] is None and s["val_loss_orig_0"] is None and np.isfinite(s["auc_new"])
    assert main([*args, "--out", str(root / "cont3"), "--orig-data", f"text:{root / 'new.txt'}"]) != 0
    assert "second corpus itself" in capsys.readouterr().err
