"""A bound on how long a run may go without progress (no Ray import here).

A cluster that loses a node can leave a run waiting for ever: an actor that cannot be placed
again, a decoding task that never gets a CPU, an object whose node is gone. Ray raises nothing
in these cases, so the engine watches its own progress (a finished chunk, from any model) and
gives up after a bounded wait with one line that says how to resume (finished shards are sealed
parts: the rerun computes only the others).

The bound is the run file's ``resources.stall_s`` when set; otherwise :data:`FLOOR` seconds, or
:data:`FACTOR` times the longest wait between two progress events seen so far when that is
longer (a slow model on a busy cluster is not a stall). The first wait of a run includes
starting replicas and loading models: it is given at least :data:`FLOOR` seconds whatever
``stall_s`` says (a short ``stall_s`` is for the waits between chunks); a run whose models take
longer to load (large weights downloaded on a fresh node) sets a longer ``stall_s``.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from probekit.errors import ProbekitError

__all__ = ["FACTOR", "FLOOR", "RunStalledError", "StallWatch", "next_or_stall"]

FLOOR = 300.0  # seconds: the default bound, and its least value when scaled
FACTOR = 10.0  # the default bound is at least this many times the longest wait seen


class RunStalledError(ProbekitError):
    """A run made no progress within its bound (see :class:`StallWatch`)."""


class StallWatch:
    """When progress was last made, and whether the wait since then passed the bound.

    Args:
        bound: fixed seconds (the run file's ``stall_s``); None: the scaled default.
        clock: seconds, monotonic (a test passes a fake one).
    """

    def __init__(self, bound: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.fixed, self.clock = bound, clock
        self.last = clock()
        self.longest = 0.0  # the longest wait between two progress events so far
        self.events = 0

    def progressed(self) -> None:
        now = self.clock()
        if self.events:  # (the first wait includes start-up: it does not scale the bound)
            self.longest = max(self.longest, now - self.last)
        self.last, self.events = now, self.events + 1

    @property
    def bound(self) -> float:
        if not self.events:  # start-up: replicas start and load their models
            return max(FLOOR, self.fixed or 0.0)
        return self.fixed if self.fixed is not None else max(FLOOR, FACTOR * self.longest)

    def waited(self) -> float:
        return self.clock() - self.last

    def left(self) -> float:
        """Seconds until the wait passes the bound (0 once it has)."""
        return max(0.0, self.bound - self.waited())


def next_or_stall(q: queue.Queue, watch: StallWatch, stalled: Callable[[float], BaseException],
                  poll: float = 1.0) -> Any:
    """The next item of ``q``, counted as progress; raises ``stalled(seconds waited)`` once the
    wait passes ``watch``'s bound (checked at least every ``poll`` seconds, the bound may grow
    while waiting)."""
    while True:
        left = watch.left()
        if left <= 0:
            raise stalled(watch.waited())
        try:
            item = q.get(timeout=min(poll, left))
        except queue.Empty:
            continue
        watch.progressed()
        return item
