"""A sweep's progress: one line for the whole sweep (done / running / failed, ETA).

In a terminal the line is redrawn in place under the event lines; anywhere else
(a log file, a pipe, a batch job) every event is one plain ``logging`` line with the
progress appended, and no carriage return is ever written.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable

from capscale.rundir import RunStatus
from capscale.sweep.worker import BUSY

logger = logging.getLogger("capscale.sweep")

HEARTBEAT_S = 300.0  # outside a terminal, a progress line at least this often


def duration(seconds: float | None) -> str:
    """``4m05s``-style; ``--`` when unknown."""
    if seconds is None:
        return "--"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def ensure_handler() -> None:
    """Give the sweep's logger a plain stderr handler when the application configured none."""
    if logger.hasHandlers():
        return
    handler = logging.StreamHandler(sys.stderr)
    tty = _isatty(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if tty else "%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts and ETA of a sweep of ``total`` runs, ``slots`` at a time.

    ``log`` receives the event lines (default: the ``capscale.sweep`` logger); the live
    line is drawn on ``stream`` only when it is a terminal and no ``log`` was given."""

    def __init__(
        self,
        name: str,
        total: int,
        slots: int,
        *,
        log: Callable[[str], None] | None = None,
        stream=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name, self.total, self.slots = name, total, max(1, slots)
        self.stream = sys.stderr if stream is None else stream
        self.live = log is None and _isatty(self.stream)
        self.log = log or logger.info
        self.clock = clock
        self.started: dict[str, float] = {}
        self.done_s: list[float] = []  # wall times of runs that finished their steps
        self.diverged_s: list[float] = []
        self.counts: Counter = Counter()
        self.t0 = self.last = clock()

    # events
    def start(self, name: str) -> None:
        self.started[name] = self.clock()
        self.say(f"  start    {name}")

    def finish(self, res) -> None:
        """``res``: an executor's RunResult."""
        self.started.pop(res.name, None)
        self.counts[res.status] += 1
        if res.status == RunStatus.DONE:
            self.done_s.append(res.seconds)
        elif res.status == RunStatus.DIVERGED:
            self.diverged_s.append(res.seconds)
        extra = f" ({res.reason})" if res.status != RunStatus.DONE and res.reason else ""
        self.say(f"  {res.status:<8} {res.name} in {duration(res.seconds)}{extra}  [{self.line()}]")

    def tick(self) -> None:
        now = self.clock()
        if self.live and now - self.last >= 1.0:
            self._draw()
        elif not self.live and now - self.last >= HEARTBEAT_S:
            self.say(f"  [{self.line()}]")

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    # the line
    def eta(self) -> float | None:
        """Seconds left: runs still queued take the mean wall time of finished runs (runs
        that diverged count only while none has finished), running ones its remainder."""
        times = self.done_s or self.diverged_s
        if not times:
            return None
        mean = sum(times) / len(times)
        now = self.clock()
        left = [max(mean - (now - t0), 0.0) for t0 in self.started.values()]
        work = sum(left) + self.queued * mean
        return max(max(left, default=0.0), work / self.slots)

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    @property
    def queued(self) -> int:
        return max(self.total - self.finished - len(self.started), 0)

    def line(self) -> str:
        c = self.counts
        parts = [f"{c[RunStatus.DONE]}/{self.total} done"]
        if c[RunStatus.DIVERGED]:
            parts.append(f"{c[RunStatus.DIVERGED]} diverged")
        parts += [f"{len(self.started)} running", f"{c[RunStatus.FAILED]} failed"]
        if c[BUSY]:
            parts.append(f"{c[BUSY]} busy elsewhere")
        parts.append(f"{self.queued} queued")
        return ", ".join(parts) + f", {duration(self.clock() - self.t0)} elapsed, ETA {duration(self.eta())}"

    def say(self, msg: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.log(msg)
        self.last = self.clock()
        if self.live:
            self._draw()

    def _draw(self) -> None:
        self.stream.write(f"\r\x1b[Ksweep {self.name}: {self.line()}")
        self.stream.flush()
        self.last = self.clock()
