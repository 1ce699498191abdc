"""Atomic file writes (temp file + rename), for every layer of capscale.

A reader, or a crash, sees the old file or the new one, never half of one. The
temp file sits next to the target (so the rename stays on one filesystem), is
created exclusively with the umask's permissions (``mkstemp`` would make it
0600: a run directory or report shared on a cluster must stay readable), and is
removed if writing fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], object], *, fsync: bool = False) -> Path:
    """``write(tmp_path)`` then rename over ``path`` (its folder is created if missing).

    ``fsync`` makes the data durable before the rename (checkpoints, run state).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """``data`` as the whole new content of ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """``text`` (UTF-8) as the whole new content of ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)
