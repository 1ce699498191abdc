"""Where training text comes from: each source is a stream of documents (strings).

Sources: the default corpus (``shakespeare``), local text files or directories, JSON
Lines (one object per line, text in a field), Parquet (text in a column), and any
Hugging Face dataset through ``datasets`` streaming, FineWeb-Edu / FineWeb included.
Every source has a ``fingerprint()`` — content hashes for local files, identifiers for
remote datasets — so token shards can be cached on (source, tokenizer), and a
``spec()`` that ``make_source`` turns back into the source.

Spec strings: ``shakespeare`` | ``text:PATH`` | ``jsonl:PATH[:FIELD]`` |
``parquet:PATH[:COLUMN]`` | ``fineweb-edu[:CONFIG]`` | ``fineweb[:CONFIG]`` |
``hf:REPO[:CONFIG]`` | a bare path (kind from its suffix). Dicts ``{"kind": ..., **fields}``
give every option.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from capscale.train import corpus


def _hash_files(paths: list[Path]) -> str:
    """One sha256 over the files' names (relative order) and bytes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _expand(path: str, pattern: str) -> list[Path]:
    """A file, or a directory's files matching ``pattern`` (recursive, sorted)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob(pattern) if f.is_file())
        if not files:
            raise FileNotFoundError(f"no files matching {pattern!r} under {p}")
        return files
    raise FileNotFoundError(f"{p} does not exist")


class Source:
    """Base: subclasses are dataclasses with a ``kind`` and ``documents()``."""

    kind: ClassVar[str]
    credit: ClassVar[str | None] = None  # license / attribution line to print with the data

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in asdict(self).items() if v is not None)
        return f"{self.kind}({fields})"


@dataclass
class ShakespeareSource(Source):
    """The default corpus (installed by ``python -m capscale.train.corpus fetch``); one document per work."""

    kind: ClassVar[str] = "shakespeare"
    credit: ClassVar[str] = corpus.CREDIT
    home: str | None = None  # cache root; None → $CAPSCALE_HOME or ~/.cache/capscale

    def documents(self) -> Iterator[str]:
        for path in corpus.corpus_files(self.home):
            yield path.read_text(encoding="utf-8")

    def fingerprint(self) -> str:
        # The manifest lists every work's sha256, so hashing it covers the text.
        doc = corpus.load_manifest(self.home)
        return hashlib.sha256(json.dumps(doc["works"], sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        return corpus.NAME


@dataclass
class TextSource(Source):
    """Plain text: one file, or every file matching ``pattern`` under a directory; one document per file."""

    kind: ClassVar[str] = "text"
    path: str = ""
    pattern: str = "*.txt"

    def documents(self) -> Iterator[str]:
        for p in _expand(self.path, self.pattern):
            yield p.read_text(encoding="utf-8")

    def fingerprint(self) -> str:
        return _hash_files(_expand(self.path, self.pattern))


@dataclass
class JsonlSource(Source):
    """JSON Lines: one object per line, the document in ``field``."""

    kind: ClassVar[str] = "jsonl"
    path: str = ""
    field: str = "text"
    pattern: str = "*.jsonl"

    def documents(self) -> Iterator[str]:
        for p in _expand(self.path, self.pattern):
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or self.field not in obj:
                        raise ValueError(f"{p}:{lineno}: no field {self.field!r} in this record")
                    if not isinstance(obj[self.field], str):
                        raise ValueError(f"{p}:{lineno}: field {self.field!r} is not a string")
                    yield obj[self.field]

    def fingerprint(self) -> str:
        return _hash_files(_expand(self.path, self.pattern)) + f":{self.field}"


@dataclass
class ParquetSource(Source):
    """Parquet file(s), the document in ``column``; read in record batches (bounded memory)."""

    kind: ClassVar[str] = "parquet"
    path: str = ""
    column: str = "text"
    pattern: str = "*.parquet"

    def documents(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        for p in _expand(self.path, self.pattern):
            pf = pq.ParquetFile(p)
            if self.column not in pf.schema_arrow.names:
                raise ValueError(f"{p} has no column {self.column!r} (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[self.column], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text is not None:
                        yield text

    def fingerprint(self) -> str:
        return _hash_files(_expand(self.path, self.pattern)) + f":{self.column}"


# The FineWeb family on the Hugging Face hub; "sample-10BT" is a 10B-token random sample.
FINEWEB_REPOS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}


@dataclass
class HFStreamingSource(Source):
    """A ``datasets`` dataset read with ``streaming=True`` (no full download).

    ``path``/``name`` as for ``datasets.load_dataset`` (``"HuggingFaceFW/fineweb-edu"``,
    ``"sample-10BT"``); ``data_files`` selects files, e.g. a local parquet set with
    ``path="parquet"``. Streams are consumed in order, so a prefix is reproducible.
    """

    kind: ClassVar[str] = "hf"
    path: str = FINEWEB_REPOS["fineweb-edu"]
    name: str | None = "sample-10BT"
    split: str = "train"
    text_field: str = "text"
    data_files: list[str] | None = None
    revision: str | None = None
    load_kwargs: dict = field(default_factory=dict)

    def documents(self) -> Iterator[str]:
        try:
            from datasets import load_dataset
        except ImportError as e:
            raise ImportError(
                "streaming from the Hugging Face hub needs the `datasets` package: "
                "pip install 'capscale[fineweb]' (or: pip install datasets)"
            ) from e
        ds = load_dataset(
            self.path,
            name=self.name,
            split=self.split,
            streaming=True,
            data_files=self.data_files,
            revision=self.revision,
            **self.load_kwargs,
        )
        for example in ds:
            if self.text_field not in example:
                raise ValueError(
                    f"{self.describe()}: records have no field {self.text_field!r} (fields: {sorted(example)})"
                )
            text = example[self.text_field]
            if text is not None:
                yield text

    def fingerprint(self) -> str:
        ident = {k: v for k, v in asdict(self).items() if k != "data_files"}
        if self.data_files:
            local = [Path(f) for f in self.data_files]
            if all(p.is_file() for p in local):
                ident["data_files"] = _hash_files(local)  # local files: hash their bytes
            else:
                ident["data_files"] = list(self.data_files)
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


SOURCES: dict[str, type[Source]] = {
    cls.kind: cls for cls in (ShakespeareSource, TextSource, JsonlSource, ParquetSource, HFStreamingSource)
}
_SUFFIX_KIND = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}


def make_source(spec: str | dict | Source | None = None) -> Source:
    """A source from a spec string or dict (see the module docstring); None → the default corpus."""
    if isinstance(spec, Source):
        return spec
    if spec is None:
        return ShakespeareSource()
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind in FINEWEB_REPOS:
            spec.setdefault("path", FINEWEB_REPOS[kind])
            kind = "hf"
        if kind not in SOURCES:
            raise ValueError(f"unknown source kind {kind!r}; choose one of {sorted(SOURCES) + sorted(FINEWEB_REPOS)}")
        try:
            return SOURCES[kind](**spec)
        except TypeError as e:
            raise ValueError(f"bad options for source {kind!r}: {e}") from None
    text = str(spec).strip()
    if not text:
        raise ValueError("empty source spec")
    kind, _, rest = text.partition(":")
    if kind == "shakespeare" and not rest:
        return ShakespeareSource()
    if kind in FINEWEB_REPOS:
        return HFStreamingSource(path=FINEWEB_REPOS[kind], name=rest or "sample-10BT")
    if kind == "hf" and rest:
        repo, _, name = rest.partition(":")
        return HFStreamingSource(path=repo, name=name or None)
    if kind in ("text", "jsonl", "parquet") and rest:
        # An optional trailing ":FIELD" for jsonl/parquet (paths may themselves hold ':').
        path, extra = rest, None
        if kind != "text" and ":" in rest and not Path(rest).exists():
            path, _, extra = rest.rpartition(":")
        if kind == "text":
            return TextSource(path=path)
        if kind == "jsonl":
            return JsonlSource(path=path, **({"field": extra} if extra else {}))
        return ParquetSource(path=path, **({"column": extra} if extra else {}))
    p = Path(text).expanduser()
    if p.exists():
        kind = "text" if p.is_dir() else _SUFFIX_KIND.get(p.suffix)
        if kind is not None:
            return SOURCES[kind](path=str(p))
    raise ValueError(
        f"unknown source {text!r}: use shakespeare, text:PATH, jsonl:PATH[:FIELD], "
        "parquet:PATH[:COLUMN], fineweb-edu[:CONFIG], fineweb[:CONFIG], hf:REPO[:CONFIG], "
        "or an existing .txt/.jsonl/.parquet file or directory"
    )
