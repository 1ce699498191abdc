"""The one owner of a run directory's life cycle: lock, identity, creation, config and status.

Two writers make run directories in the format of docs/run-format.md: the harness
(``capscale train``, train/loop.py) and any training loop through
``capscale.attach(out=...)`` (probe/runwriter.py). Both go through :class:`RunOwner`
to take the directory's lock, to refuse a directory that holds another run, to
create it with its ``config.json``, and to write ``status.json``; what each does
with a directory that holds this run already (resume it, or refuse a finished one)
is its own policy. The bytes and files are :class:`~capscale.rundir.RunDir`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from capscale.rundir import RunDir, RunStatus

_READ = object()  # refuse_other_run's default: read config.json now


class RunOwner:
    """Owns one run directory: ``what`` names the config in refusals ("config", "run_config"),
    ``advice`` says what to do instead ("use another --out")."""

    def __init__(self, path: str | Path, *, what: str, advice: str):
        self.run = RunDir(path)
        self.what, self.advice = what, advice

    @property
    def path(self) -> Path:
        return self.run.path

    def lock(self, **options):
        """The directory's lock (``RunDir.lock``): one writer at a time, refused at once naming the holder."""
        return self.run.lock(**options)

    def refuse_other_run(
        self,
        config: dict,
        identity: Callable[[dict], Any],
        *,
        old: Any = _READ,
        name_keys: bool = False,
    ) -> None:
        """Refuse, in one line, a directory whose ``config.json`` (or ``old``, already read) is
        another run's: its ``identity`` differs from that of ``config``. ``name_keys`` lists
        the keys that differ."""
        if old is _READ:
            old = self.run.read_config()
        if old is None:
            return
        a, b = identity(old), identity(config)
        if a != b:
            why = f" (differs in {diff_keys(a, b)})" if name_keys else ""
            raise ValueError(f"{self.path} holds a run with a different {self.what}{why}; {self.advice}")

    def begin(self, config: dict, step: int | None = None) -> None:
        """Create the directory and write its ``config.json``; with ``step``, status "running" there."""
        self.run.create()
        self.run.write_config(config)
        if step is not None:
            self.set_status(RunStatus.RUNNING, step)

    def set_status(self, status: RunStatus | str, step: int, reason: str | None = None) -> None:
        self.run.write_status(status, int(step), reason)


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys at which two nested dicts differ, sorted."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys
