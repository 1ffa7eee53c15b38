"""SIGTERM stops a run as Ctrl-C does.

Why: SLURM (``scancel``, a time limit), Kubernetes (pod eviction) and ``kill`` send SIGTERM, whose
default action ends the process at once: ``run.json`` would stay ``running`` with no word of what
happened, and Ray's own handler (``sys.exit``) ends a driver with a native stack dump. While a run
works, SIGTERM raises :class:`Terminated`, a :class:`KeyboardInterrupt`, in the main thread, so
every path that handles Ctrl-C handles it: finished parts are kept, ``run.json`` says
``interrupted``, and the same command resumes. The command exits with 143 (128 + 15, the shell's
convention for a process ended by SIGTERM; Ctrl-C gives 130).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "sigterm_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM during a run (raised like Ctrl-C's KeyboardInterrupt)."""

    exit_code = 128 + int(signal.SIGTERM)  # 143


def _raise_terminated(signum, frame) -> None:
    raise Terminated("SIGTERM received")


@contextmanager
def sigterm_as_interrupt(replace: bool = False) -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated`; the previous handler is back after.

    Only the main thread can set handlers: elsewhere nothing changes. A handler the application
    set itself is left in place unless ``replace`` (the Ray engine replaces the one ``ray.init``
    sets, which calls ``sys.exit``).
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not replace and previous not in (signal.SIG_DFL, None):
        yield  # SIG_IGN, or the application's own handler: its choice
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
