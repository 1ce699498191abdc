"""Atomic writes: all or nothing, readable by others, no temp files left behind."""

import os
import stat

import pytest

from capscale.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_new_content_replaces_old_whole_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "f.json"
    old = os.umask(0o022)
    try:
        atomic_write_text(target, "old")
        atomic_write_bytes(target, b"new", fsync=True)
    finally:
        os.umask(old)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert os.listdir(target.parent) == ["f.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "kept")

    def half(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half)
    assert target.read_text() == "kept"
    assert os.listdir(tmp_path) == ["f.txt"]
