"""Token shards and batches: source → tokenizer → one memmapped token file → (x, y).

A *shard* is a directory holding ``tokens.bin`` (raw uint16, or uint32 for vocabularies
over 65,536) and ``meta.json`` (tokenizer spec, source, fingerprints, counts). Shards live
in ``<cache>/shards/`` keyed on (source fingerprint, tokenizer fingerprint, max_tokens),
so a second run on the same data reuses the file. Each document is preceded by the
tokenizer's end-of-text id (the GPT-2 convention).

The last ``val_fraction`` of the token stream is the validation split; training windows
never reach into it. Training batches are a pure function of
(seed, step, micro_step, rank, world_size): a resumed run sees exactly the same data and
needs no saved data position, and data-parallel ranks draw disjoint windows. Validation
batches are fixed: consecutive windows from the start of the split, the same every eval.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from capscale.spectrum import FrequencyTable
from capscale.train.corpus import cache_home
from capscale.train.sources import Source, make_source
from capscale.train.tokenizer import (
    Tokenizer,
    make_tokenizer,
    padded_vocab_size,
    parse_tokenizer_name,
)

SHARD_FORMAT = "capscale.token_shard"
SHARD_VERSION = 1
_TOKENS, _META = "tokens.bin", "meta.json"
_DOCS_PER_CHUNK = 256  # documents tokenized per encode_batch call (bounded memory)
_LOG_EVERY_S = 10.0
_BPE_TRAIN_CHARS = 200_000_000  # a byte-level BPE is fitted on at most this much text
_TRAIN_STREAM, _COUNT_CHUNK = 0x7472, 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class DataConfig:
    """What the data side of a run needs; everything else is derived from it."""

    source: str | dict = "shakespeare"  # see capscale.train.sources.make_source
    tokenizer: str = "gpt2"  # gpt2 | bytes | bytebpe:N
    val_fraction: float = 0.1  # last fraction of the token stream held out
    max_tokens: int | None = None  # stop reading the source after this many tokens
    cache_dir: str | None = None  # None → $CAPSCALE_HOME or ~/.cache/capscale


# -- shards ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenShard:
    path: Path  # the shard directory
    meta: dict
    tokens: np.ndarray  # read-only memmap of all tokens
    built: bool = False  # True if this call tokenized the source (False: reused)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])


def _open_shard(path: Path) -> TokenShard | None:
    """The shard in ``path`` if it is complete and consistent, else None."""
    try:
        with open(path / _META) as f:
            meta = json.load(f)
        if meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_VERSION:
            return None
        dtype = np.dtype(meta["dtype"])
        if (path / _TOKENS).stat().st_size != meta["n_tokens"] * dtype.itemsize:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tokens = np.memmap(path / _TOKENS, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    return TokenShard(path, meta, tokens)


def _chunks(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for d in docs:
        if d.strip():  # whitespace-only documents carry nothing to learn
            buf.append(d)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _write_tokens(
    source: Source, tok: Tokenizer, out: Path, max_tokens: int | None, log: Callable[[str], None]
) -> dict:
    """Stream the source through the tokenizer into ``out``; returns the counts."""
    dtype = token_dtype(tok.vocab_size)
    n_tokens = n_docs = n_chars = 0
    truncated = False  # stopped at max_tokens
    last_log = time.monotonic()
    with open(out, "wb") as f:
        for docs in _chunks(source.documents(), _DOCS_PER_CHUNK):
            for text, ids in zip(docs, tok.encode_batch(docs), strict=True):
                row = np.empty(len(ids) + 1, dtype=dtype)
                row[0] = tok.eot_id
                row[1:] = ids
                if max_tokens is not None and n_tokens + row.size >= max_tokens:
                    row, truncated = row[: max_tokens - n_tokens], True
                f.write(row.tobytes())
                n_tokens += row.size
                n_docs += 1
                n_chars += len(text)
                if truncated:
                    break
            if truncated:
                break
            if time.monotonic() - last_log > _LOG_EVERY_S:  # long streams (FineWeb) report progress
                log(f"tokenized {n_docs:,} documents, {n_tokens:,} tokens")
                last_log = time.monotonic()
    if n_tokens == 0:
        raise ValueError(f"source {source.describe()} yielded no text to tokenize")
    log(f"tokenized {n_docs:,} documents, {n_tokens:,} tokens{' (max_tokens reached)' if truncated else ''}")
    return {"n_tokens": n_tokens, "n_docs": n_docs, "n_chars": n_chars, "truncated": truncated}


def shard_key(source_kind: str, source_fingerprint: str, tok: Tokenizer, max_tokens: int | None) -> str:
    ident = [SHARD_VERSION, source_kind, source_fingerprint, tok.fingerprint(), max_tokens]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def prepare_tokens(
    source: Source | str | dict | None,
    tok: Tokenizer,
    *,
    cache_dir: str | Path | None = None,
    max_tokens: int | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] | None = None,
) -> TokenShard:
    """Tokenize ``source`` into a cached shard, or reuse the one already there.

    Safe to call from several processes at once (e.g. every data-parallel rank): each
    builds in a private temporary directory and the first to finish is kept.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    source = make_source(source)
    log = log or (lambda msg: None)
    root = Path(cache_dir) if cache_dir is not None else cache_home()
    fingerprint = source.fingerprint()  # hashes local files: compute once
    key = shard_key(source.kind, fingerprint, tok, max_tokens)
    path = root / "shards" / f"{source.kind}-{tok.name}-{key}"
    if not rebuild and (shard := _open_shard(path)) is not None:
        return shard
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other
    try:
        counts = _write_tokens(source, tok, tmp / _TOKENS, max_tokens, log)
        meta = {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "key": key,
            "dtype": token_dtype(tok.vocab_size).name,
            **counts,
            "tokenizer": tok.spec(),
            "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "model_vocab_size": padded_vocab_size(tok.vocab_size),
            "eot_id": tok.eot_id,
            "source": source.spec(),
            "source_description": source.describe(),
            "source_fingerprint": fingerprint,
            "max_tokens": max_tokens,
            "credit": source.credit,
        }
        (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")
        if path.exists() and (rebuild or _open_shard(path) is None):
            shutil.rmtree(path, ignore_errors=True)  # asked to rebuild, or stale/damaged
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: keep its (identical) shard
            if _open_shard(path) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shard = _open_shard(path)
    assert shard is not None, f"shard {path} unreadable right after writing it"
    return TokenShard(shard.path, shard.meta, shard.tokens, built=True)


# -- tokenizer for a source ---------------------------------------------------


def tokenizer_for(
    name: str, source: Source | str | dict | None = None, *, cache_dir: str | Path | None = None
) -> Tokenizer:
    """``make_tokenizer`` with a trained byte-level BPE cached per (source, size)."""
    kind, size = parse_tokenizer_name(name)
    if kind != "bytebpe":
        return make_tokenizer(name)
    source = make_source(source)
    root = Path(cache_dir) if cache_dir is not None else cache_home()
    cache_path = root / "tokenizers" / f"bytebpe-{size}-{source.kind}-{source.fingerprint()[:16]}.json"
    # The BPE is fitted on the source's first _BPE_TRAIN_CHARS characters (all of a small
    # corpus, so its vocabulary sees the validation text too, as nanoGPT's character
    # vocabulary does; only merges are learned, not predictions). The cap bounds a stream.
    return make_tokenizer(name, texts=_prefix(source.documents(), _BPE_TRAIN_CHARS), cache_path=cache_path)


def _prefix(docs: Iterator[str], max_chars: int) -> Iterator[str]:
    n = 0
    for d in docs:
        if n >= max_chars:
            return
        n += len(d)
        yield d


# -- batches -----------------------------------------------------------------


def _check_nonneg(**kw: int) -> None:
    for k, v in kw.items():
        if int(v) < 0:
            raise ValueError(f"{k} must be >= 0, got {v}")


def _to_xy(windows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Separate contiguous copies, so callers may .view(-1) the targets.
    out = []
    for part in (windows[:, :-1], windows[:, 1:]):
        t = torch.from_numpy(np.ascontiguousarray(part, dtype=np.int64))
        if device is not None and torch.device(device).type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        elif device is not None:
            t = t.to(device)
        out.append(t)
    return out[0], out[1]


class TokenData:
    """A shard split into train and validation, with deterministic batches."""

    def __init__(self, shard: TokenShard, tokenizer: Tokenizer, val_fraction: float = 0.1):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.shard, self.tokenizer, self.val_fraction = shard, tokenizer, float(val_fraction)
        n = shard.n_tokens
        self.n_train = n - int(round(n * val_fraction))
        if self.n_train < 2 or n - self.n_train < 2:
            raise ValueError(f"{n} tokens cannot be split into train and validation with val_fraction={val_fraction}")
        self.train_tokens = shard.tokens[: self.n_train]
        self.val_tokens = shard.tokens[self.n_train :]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def model_vocab_size(self) -> int:
        """Embedding rows for the model (vocab padded to a multiple of 64)."""
        return padded_vocab_size(self.tokenizer.vocab_size)

    # -- training ----------------------------------------------------------
    def train_windows(
        self,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        step: int,
        micro_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> np.ndarray:
        """``[batch_size, seq_len + 1]`` token windows for this rank, a pure function of the arguments.

        The training split is cut into back-to-back windows of ``seq_len + 1`` tokens on a
        grid with a random phase; ``batch_size * world_size`` distinct windows are drawn
        (so no token is shared across ranks or rows) and rank r takes rows
        ``r*B … (r+1)*B - 1``. Each (seed, step, micro_step) has its own generator.
        """
        _check_nonneg(seed=seed, step=step, micro_step=micro_step, rank=rank)
        if batch_size < 1 or seq_len < 1 or world_size < 1 or rank >= world_size:
            raise ValueError(
                f"need batch_size, seq_len, world_size >= 1 and rank < world_size; "
                f"got {batch_size}, {seq_len}, {world_size}, rank {rank}"
            )
        width, need = seq_len + 1, batch_size * world_size
        if self.n_train // width < need:
            raise ValueError(
                f"the training split has {self.n_train:,} tokens: too few for {need} disjoint windows of {width} tokens"
            )
        rng = np.random.default_rng([_TRAIN_STREAM, seed, step, micro_step])
        phase = int(rng.integers(0, min(seq_len, self.n_train - need * width) + 1))
        n_windows = (self.n_train - phase) // width
        picks = rng.choice(n_windows, size=need, replace=False)[rank * batch_size : (rank + 1) * batch_size]
        starts = phase + picks.astype(np.int64) * width
        return np.asarray(self.train_tokens[starts[:, None] + np.arange(width)])

    def train_batch(
        self,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        step: int,
        micro_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, each ``[batch_size, seq_len]`` int64: y is x shifted by one token."""
        w = self.train_windows(
            batch_size, seq_len, seed=seed, step=step, micro_step=micro_step, rank=rank, world_size=world_size
        )
        return _to_xy(w, device)

    # -- validation --------------------------------------------------------
    def num_val_batches(self, batch_size: int, seq_len: int, world_size: int = 1) -> int:
        return (len(self.val_tokens) // (seq_len + 1)) // (batch_size * world_size)

    def val_windows(
        self, index: int, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1
    ) -> np.ndarray:
        """Validation batch ``index``: consecutive, non-overlapping windows from the split's start."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        available = self.num_val_batches(batch_size, seq_len, world_size)
        if not 0 <= index < available:
            raise ValueError(
                f"validation batch {index} does not exist: the split ({len(self.val_tokens):,} "
                f"tokens) holds {available} batches of {batch_size}x{seq_len + 1}"
                f"{f' x {world_size} ranks' if world_size > 1 else ''}"
            )
        width = seq_len + 1
        first = (index * world_size + rank) * batch_size
        starts = (first + np.arange(batch_size)) * width
        return np.asarray(self.val_tokens[starts[:, None] + np.arange(width)])

    def val_batches(
        self,
        batch_size: int,
        seq_len: int,
        n_batches: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        device=None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed validation set: batches 0 … n_batches-1 (all that fit if None)."""
        n = self.num_val_batches(batch_size, seq_len, world_size) if n_batches is None else n_batches
        for i in range(n):
            yield _to_xy(self.val_windows(i, batch_size, seq_len, rank=rank, world_size=world_size), device)

    # -- token statistics --------------------------------------------------
    def train_counts(self) -> np.ndarray:
        """Unigram counts of the training tokens over the model's (padded) vocabulary."""
        counts = np.zeros(self.model_vocab_size, dtype=np.int64)
        for i in range(0, self.n_train, _COUNT_CHUNK):
            counts += np.bincount(self.train_tokens[i : i + _COUNT_CHUNK], minlength=counts.size)
        return counts

    def frequency_table(self) -> FrequencyTable:
        """HEAD/MID/TAIL table of the training tokens, cached next to the shard.

        Counts span the padded vocabulary (never-seen ids are TAIL), as in the paper's
        reference statistics (50,304 types for GPT-2).
        """
        path = self.shard.path / f"unigram_train_{self.n_train}.json"
        if path.is_file():
            try:
                return FrequencyTable.load(path)
            except (OSError, ValueError, KeyError):
                pass  # damaged cache: recount
        table = FrequencyTable(self.train_counts())
        table.save(path)
        return table


def load_data(config: DataConfig | None = None, *, log: Callable[[str], None] | None = None, **overrides) -> TokenData:
    """Source + tokenizer + shard + split in one call: ``load_data(tokenizer="bytes")``."""
    cfg = config or DataConfig()
    if overrides:
        cfg = replace(cfg, **overrides)
    source = make_source(cfg.source)
    tok = tokenizer_for(cfg.tokenizer, source, cache_dir=cfg.cache_dir)
    shard = prepare_tokens(source, tok, cache_dir=cfg.cache_dir, max_tokens=cfg.max_tokens, log=log)
    return TokenData(shard, tok, cfg.val_fraction)
