"""Tokenizers: offline GPT-2 BPE, trained byte-level BPE, raw bytes; specs and bad input."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capscale.train import tokenizer as tk
from capscale.train.tokenizer import (
    ByteBPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    make_tokenizer,
    padded_vocab_size,
    tokenizer_from_spec,
)

pytest.importorskip("tiktoken")
pytest.importorskip("tokenizers")


def synthetic_texts(n_docs=40, words_per_doc=300, seed=0) -> list[str]:
    """Zipf-ish prose over a small invented vocabulary (no third-party text)."""
    rng = np.random.default_rng(seed)
    vocab = [
        "the",
        "a",
        "of",
        "and",
        "lantern",
        "river",
        "quietly",
        "north",
        "stone",
        "seven",
        "Harbor",
        "glimmer",
        "wandering",
        "capacity",
        "spectrum",
        "ünïcode",
        "naïve",
        "42",
        "—",
        "!",
    ]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    docs = []
    for _ in range(n_docs):
        words = rng.choice(vocab, size=words_per_doc, p=p)
        lines = [" ".join(words[i : i + 12]) for i in range(0, words_per_doc, 12)]
        docs.append(".\n".join(lines) + ".\n")
    return docs


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def bpe() -> ByteBPETokenizer:
    return ByteBPETokenizer.train(synthetic_texts(), 300)


def test_gpt2_hello_world(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert (gpt2.vocab_size, gpt2.eot_id, padded_vocab_size(gpt2.vocab_size)) == (50257, 50256, 50304)
    assert isinstance(gpt2, Tokenizer)


def test_gpt2_treats_special_text_as_data(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert gpt2.eot_id not in ids and gpt2.decode(ids) == "a<|endoftext|>b"
    assert gpt2.encode_batch(["Hello world", " world"]) == [[15496, 995], [995]]


def test_gpt2_files_match_tiktoken_hashes():
    vocab_bpe, encoder_json = tk.gpt2_files()
    assert hashlib.sha256(vocab_bpe.read_bytes()).hexdigest() == tk.GPT2_VOCAB_BPE_SHA256
    assert hashlib.sha256(encoder_json.read_bytes()).hexdigest() == tk.GPT2_ENCODER_JSON_SHA256


def test_gpt2_refuses_altered_files(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = tk.gpt2_files()
    bad = tmp_path / "vocab.bpe"
    shutil.copy(vocab_bpe, bad)
    with open(bad, "ab") as f:
        f.write(b"x y\n")
    monkeypatch.setattr(tk, "gpt2_files", lambda: (bad, encoder_json))
    with pytest.raises(ValueError, match="sha256"):
        GPT2Tokenizer()


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_byte_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_byte_bpe_learns_merges_and_is_deterministic(bpe):
    docs = synthetic_texts()
    assert bpe.vocab_size == 300 and bpe.eot_id == 0
    ids = bpe.encode(docs[0])
    assert len(ids) < len(docs[0].encode()) / 2  # merges compress the text
    again = ByteBPETokenizer.train(synthetic_texts(), 300)
    assert again.fingerprint() == bpe.fingerprint()
    assert again.encode(docs[1]) == bpe.encode(docs[1])
    assert bpe.encode_batch(docs[:2]) == [bpe.encode(docs[0]), bpe.encode(docs[1])]


def test_byte_bpe_save_load_and_spec(bpe, tmp_path):
    path = bpe.save(tmp_path / "tok" / "bpe.json")
    spec = bpe.spec()
    assert spec["path"] == str(path) and spec["vocab_size"] == 300
    back = tokenizer_from_spec(spec)
    text = "the river glimmer, naïve 42!"
    assert back.encode(text) == bpe.encode(text) and back.fingerprint() == bpe.fingerprint()
    path.write_text(path.read_text() + "\n")  # any change to the file breaks the spec
    with pytest.raises(ValueError, match="sha256"):
        tokenizer_from_spec(spec)


def test_make_tokenizer_trains_once_then_loads(tmp_path):
    cache = tmp_path / "bpe-280.json"
    first = make_tokenizer("bytebpe:280", texts=synthetic_texts(10), cache_path=cache)
    assert cache.is_file() and first.vocab_size == 280
    # Loaded from the cache: no texts needed the second time.
    second = make_tokenizer("bytebpe:280", cache_path=cache)
    assert second.fingerprint() == first.fingerprint()


def test_bytes_tokenizer():
    t = ByteTokenizer()
    assert t.encode("hé") == [104, 195, 169] and t.decode([104, 195, 169, t.eot_id]) == "hé"
    assert tokenizer_from_spec(t.spec()).vocab_size == 257 and padded_vocab_size(257) == 320


def test_bad_tokenizer_names_and_sizes():
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        make_tokenizer("gpt5")
    with pytest.raises(ValueError, match="bytebpe:VOCAB_SIZE"):
        make_tokenizer("bytebpe:lots")
    with pytest.raises(ValueError, match="too small"):
        make_tokenizer("bytebpe:200", texts=["some text"])
    with pytest.raises(ValueError, match="must be trained"):
        make_tokenizer("bytebpe:512")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_spec({"name": "sentencepiece"})
    with pytest.raises(ValueError, match="path"):
        tokenizer_from_spec({"name": "bytebpe"})
