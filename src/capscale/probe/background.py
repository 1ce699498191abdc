"""The background worker: finished windows' snapshots decomposed off the training path.

One worker thread; results are handed back in window order, at a later probe call,
and a worker's error is raised there (``Probe(background=...)``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

# Background windows whose snapshots may wait for the worker before a window close blocks.
MAX_PENDING = 2


class Background:
    """One worker thread and the windows it has been given, oldest first."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="capscale-spectra", initializer=_one_thread)
        self._pending: deque = deque()  # (window start, future of its rows, captured)

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def add(self, start: int, job: Future, captured: bool) -> None:
        self._pending.append((start, job, captured))

    def finished(self, wait: bool, keep: int = 0) -> Iterator[tuple[int, list[dict], bool]]:
        """``(start, rows, captured)`` in window order: those finished (all but ``keep`` when ``wait``).
        A worker's error is raised here."""
        while len(self._pending) > keep and (wait or self._pending[0][1].done()):
            start, job, captured = self._pending.popleft()
            yield start, job.result(), captured

    def shutdown(self) -> None:
        """Drop what is not yet handed back and wait for the thread to end."""
        self._pending.clear()
        self._pool.shutdown(wait=True)


def _one_thread() -> None:
    """The background worker's torch ops run on its own thread only.

    A thread that runs a parallel torch op gets its own OpenMP team, whose threads spin
    between regions and take the cores training uses: ~20% slower steps for as long as
    the worker lives (measured, docs/benchmarks.md). The setting is the calling thread's
    own; training keeps its threads.
    """
    torch.set_num_threads(1)
