"""Checkpoints: model, optimizer, RNG, data position and probe state in one file.

Saved atomically (temp + rename) and loaded with ``torch.load(weights_only=True)``
only, so a checkpoint can never execute code. Validated on load: a corrupt file or
one from a different config is a clear error and nothing is overwritten.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from capscale.atomic import atomic_write_bytes

FORMAT = "capscale.checkpoint"
VERSION = 1
_NAME = re.compile(r"step_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, foreign, or from another config."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.search(p.name))]
    return sorted(found)


def rng_state() -> dict[str, Any]:
    """The torch generators' states. The loop draws randomness only from torch
    (init) and from per-(seed, step) generators of its own (batches), so this is
    all a bit-identical resume needs."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], *, keep: int = 1) -> Path:
    """Write ``payload`` (+ format tag and step) as ``step_XXXXXXXX.pt``; keep the last ``keep``."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "step": step, **payload}, buf)
    path = checkpoint_path(directory, step)
    atomic_write_bytes(path, buf.getvalue(), fsync=True)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, *, config: dict) -> dict[str, Any]:
    """Load and validate a checkpoint against the run's resolved ``config``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        # torch's weights_only refusal runs to several paragraphs: one line of it is said
        text = str(exc)
        unpickler = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, re.S)
        first = " ".join(unpickler.group(1).split()) if unpickler else (text.strip().splitlines() or [""])[0]
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if glob:  # a pickled object: refused by weights_only, its code did not run
            raise CheckpointError(
                f"checkpoint {path} holds pickled objects, not only tensors ({glob.group(1)}): refused unread "
                "(capscale loads checkpoints with torch.load(weights_only=True); nothing in it ran)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a capscale checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}, expected {VERSION}")
    if ckpt.get("model_config") != config.get("model") or ckpt.get("optimizer_config") != config.get("optimizer"):
        raise CheckpointError(f"checkpoint {path} was written for a different model/optimizer config than this run's")
    return ckpt
