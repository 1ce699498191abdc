"""Token shards (cache, reuse, dtype, bad input), splits, deterministic batches, unigram table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capscale.spectrum import FrequencyTable
from capscale.train import corpus
from capscale.train.data import DataConfig, TokenData, TokenShard, load_data, prepare_tokens
from capscale.train.sources import TextSource
from capscale.train.tokenizer import ByteTokenizer


def write_corpus(root: Path, n_docs=6, seed=0) -> Path:
    """A directory of small invented documents (no third-party text)."""
    rng = np.random.default_rng(seed)
    words = np.array(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"])
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = int(rng.integers(300, 600))
        text = " ".join(rng.choice(words, size=n, p=np.linspace(10, 1, 10) / 55))
        (root / f"doc{i:02d}.txt").write_text(text + ".\n")
    return root


@pytest.fixture
def text_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


class PositionTokenizer:
    """Stand-in with a large vocabulary, for the dtype and position tests."""

    name, vocab_size, eot_id = "positions", 70_000, 69_999

    def encode_batch(self, texts):
        return [[60_000 + len(t) % 100, 65_600 + len(t) % 7] for t in texts]

    def spec(self):
        return {"name": self.name}

    def fingerprint(self):
        return "positions-v1"


def position_data(n=20_000, val_fraction=0.1) -> TokenData:
    """Token value == stream position, so a window shows exactly where it came from."""
    shard = TokenShard(Path("/nonexistent"), {"n_tokens": n}, np.arange(n, dtype=np.uint32))
    return TokenData(shard, PositionTokenizer(), val_fraction)


# -- shards -------------------------------------------------------------------


def test_shard_contents_and_header(text_dir, tmp_path):
    tok = ByteTokenizer()
    shard = prepare_tokens(TextSource(str(text_dir)), tok, cache_dir=tmp_path / "cache")
    docs = [p.read_text() for p in sorted(text_dir.glob("*.txt"))]
    expected = np.concatenate([[tok.eot_id, *tok.encode(d)] for d in docs])
    assert shard.built and np.array_equal(shard.tokens, expected)
    assert shard.tokens.dtype == np.uint16 and shard.path.parent == tmp_path / "cache" / "shards"
    meta = json.loads((shard.path / "meta.json").read_text())
    assert meta["n_tokens"] == len(expected) and meta["n_docs"] == len(docs)
    assert meta["tokenizer"] == {"name": "bytes"} and meta["source"]["kind"] == "text"
    assert meta["model_vocab_size"] == 320 and meta["truncated"] is False


def test_shard_is_reused_and_reproducible(text_dir, tmp_path):
    tok = ByteTokenizer()
    a = prepare_tokens(TextSource(str(text_dir)), tok, cache_dir=tmp_path / "c1")
    stamp = (a.path / "tokens.bin").stat().st_mtime_ns
    again = prepare_tokens(TextSource(str(text_dir)), tok, cache_dir=tmp_path / "c1")
    assert not again.built and again.path == a.path
    assert (a.path / "tokens.bin").stat().st_mtime_ns == stamp
    b = prepare_tokens(TextSource(str(text_dir)), tok, cache_dir=tmp_path / "c2")
    assert b.built and b.path.name == a.path.name
    assert (a.path / "tokens.bin").read_bytes() == (b.path / "tokens.bin").read_bytes()
    # A damaged shard is rebuilt, not trusted.
    with open(a.path / "tokens.bin", "ab") as f:
        f.write(b"\0\0")
    assert prepare_tokens(TextSource(str(text_dir)), tok, cache_dir=tmp_path / "c1").built
    # New text → a new key.
    (text_dir / "doc00.txt").write_text("different words entirely")
    c = prepare_tokens(TextSource(str(text_dir)), tok, cache_dir=tmp_path / "c1")
    assert c.built and c.path != a.path


def test_large_vocab_uses_uint32_and_max_tokens_truncates(text_dir, tmp_path):
    shard = prepare_tokens(TextSource(str(text_dir)), PositionTokenizer(), cache_dir=tmp_path)
    assert shard.tokens.dtype == np.uint32 and shard.tokens.max() == 69_999
    short = prepare_tokens(TextSource(str(text_dir)), ByteTokenizer(), cache_dir=tmp_path, max_tokens=1000)
    assert short.n_tokens == 1000 and short.meta["truncated"] is True
    assert short.path != prepare_tokens(TextSource(str(text_dir)), ByteTokenizer(), cache_dir=tmp_path).path


def test_gpt2_shard_matches_direct_encoding(text_dir, tmp_path):
    data = load_data(source=f"text:{text_dir}", tokenizer="gpt2", cache_dir=str(tmp_path))
    tok = data.tokenizer
    docs = [p.read_text() for p in sorted(text_dir.glob("*.txt"))]
    expected = np.concatenate([[tok.eot_id, *tok.encode(d)] for d in docs])
    assert np.array_equal(data.shard.tokens, expected)
    assert data.model_vocab_size == 50304 and data.shard.tokens.dtype == np.uint16


def test_bytebpe_is_trained_once_per_source(text_dir, tmp_path):
    cfg = DataConfig(source=f"text:{text_dir}", tokenizer="bytebpe:300", cache_dir=str(tmp_path))
    first = load_data(cfg)
    # A ten-word corpus supports fewer than 300 types: the tokenizer says how many it has.
    assert 257 < first.vocab_size <= 300 and first.shard.built
    assert first.shard.tokens.max() < first.vocab_size
    assert len(list((tmp_path / "tokenizers").glob("bytebpe-300-*.json"))) == 1
    second = load_data(cfg)
    assert not second.shard.built and second.tokenizer.fingerprint() == first.tokenizer.fingerprint()


def test_bad_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="yielded no text"):
        prepare_tokens(TextSource(str(empty)), ByteTokenizer(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_data(source=f"text:{empty}", tokenizer="wordpiece", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="val_fraction"):
        position_data(val_fraction=1.0)
    with pytest.raises(TypeError):
        load_data(batch_size=3)


def test_missing_default_corpus_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSCALE_HOME", str(tmp_path))
    with pytest.raises(corpus.CorpusNotInstalledError, match=r"python -m capscale\.train\.corpus fetch"):
        load_data(tokenizer="bytes")


# -- splits and batches ---------------------------------------------------------


def test_train_and_val_are_disjoint():
    data = position_data()
    assert data.n_train == 18_000 and len(data.val_tokens) == 2_000
    for step in range(50):
        w = data.train_windows(4, 63, seed=1, step=step, world_size=2, rank=step % 2)
        assert w.max() < data.n_train  # targets included
        assert np.all(np.diff(w, axis=1) == 1)  # contiguous windows
    val = np.stack([data.val_windows(i, 4, 63) for i in range(data.num_val_batches(4, 63))])
    assert val.min() == data.n_train and val.max() < 20_000
    assert len(np.unique(val)) == val.size  # validation windows never overlap


def test_batches_are_a_pure_function_of_seed_step_micro_rank():
    data = position_data()
    args = dict(seed=3, step=7, micro_step=1, rank=1, world_size=4)
    ref = data.train_windows(8, 31, **args)
    data.train_windows(8, 31, seed=3, step=2)  # unrelated calls in between change nothing
    assert np.array_equal(position_data().train_windows(8, 31, **args), ref)
    for change in ({"seed": 4}, {"step": 8}, {"micro_step": 0}):
        assert not np.array_equal(data.train_windows(8, 31, **{**args, **change}), ref)


def test_ranks_get_disjoint_windows():
    data = position_data()
    for step in range(20):
        per_rank = [data.train_windows(6, 31, seed=0, step=step, rank=r, world_size=4) for r in range(4)]
        tokens = np.concatenate([w.ravel() for w in per_rank])
        assert len(np.unique(tokens)) == tokens.size  # no token shared by two rows or ranks


def test_xy_shift_and_dtype(text_dir, tmp_path):
    data = load_data(source=f"text:{text_dir}", tokenizer="bytes", cache_dir=str(tmp_path), val_fraction=0.2)
    x, y = data.train_batch(4, 32, seed=0, step=0)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.is_contiguous() and y.is_contiguous()  # losses may .view(-1) the targets
    w = torch.from_numpy(data.train_windows(4, 32, seed=0, step=0).astype(np.int64))
    assert torch.equal(x, w[:, :-1]) and torch.equal(y, w[:, 1:])


def test_validation_set_is_fixed_and_split_across_ranks():
    data = position_data()
    first = [torch.cat(b) for b in data.val_batches(4, 31, n_batches=3)]
    second = [torch.cat(b) for b in data.val_batches(4, 31, n_batches=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert data.num_val_batches(4, 31) == 15 and data.num_val_batches(4, 31, world_size=2) == 7
    r0, r1 = (data.val_windows(0, 4, 31, rank=r, world_size=2) for r in range(2))
    assert np.array_equal(np.concatenate([r0, r1]), data.val_windows(0, 8, 31))
    with pytest.raises(ValueError, match="holds 15 batches"):
        data.val_windows(15, 4, 31)


def test_too_little_data_for_the_batch():
    data = position_data(n=1_000)
    with pytest.raises(ValueError, match="too few"):
        data.train_windows(16, 63, seed=0, step=0)
    with pytest.raises(ValueError, match="rank"):
        data.train_windows(1, 8, seed=0, step=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="step must be >= 0"):
        data.train_windows(1, 8, seed=0, step=-1)


# -- unigram counts -----------------------------------------------------------------


def test_frequency_table_equals_direct_bincount(text_dir, tmp_path):
    data = load_data(source=f"text:{text_dir}", tokenizer="bytes", cache_dir=str(tmp_path))
    table = data.frequency_table()
    direct = np.bincount(np.asarray(data.shard.tokens[: data.n_train]), minlength=320)
    assert isinstance(table, FrequencyTable) and np.array_equal(table.counts, direct)
    assert table.vocab_size == data.model_vocab_size == 320
    saved = data.shard.path / f"unigram_train_{data.n_train}.json"
    assert saved.is_file() and FrequencyTable.load(saved) == table
    assert data.frequency_table() == table  # reloaded from the cache
    # Validation tokens are not counted.
    assert table.counts.sum() == data.n_train < data.shard.n_tokens


@pytest.mark.skipif(
    not corpus.is_installed(),
    reason="default corpus not installed: run `python -m capscale.train.corpus fetch`",
)
def test_default_corpus_with_gpt2(tmp_path):
    data = load_data(tokenizer="gpt2", cache_dir=str(tmp_path))
    assert data.shard.meta["credit"] == corpus.CREDIT
    assert 1_500_000 < data.shard.n_tokens < 1_650_000 and data.shard.meta["n_docs"] == 42
    stats = data.frequency_table().stats()["buckets"]
    assert stats["head"]["num_types"] < stats["mid"]["num_types"] < stats["tail"]["num_types"]
