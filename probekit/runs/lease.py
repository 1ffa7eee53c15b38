"""The lock of a run directory in an object store: a lease that its run renews.

Why: a local run directory's lock is a kernel lock (:mod:`probekit.runs.rundir`), which the kernel
drops when its process dies. An object store has no such thing, so the lock is an object,
``.lock``, that says who holds it and until when:

- taken with a create-only write (S3 ``If-None-Match: *``): of two runs, exactly one creates it;
- renewed every third of its time to live by a heartbeat thread, each renewal a compare-and-swap
  (``If-Match`` the ETag of the holder's last write): a run that lost its lock learns it at its
  next renewal, and refuses to write ``run.json`` again;
- a lock whose expiry has passed (its run died without releasing it: SIGKILL, a lost node) is taken
  over, also by compare-and-swap over the version that was read, so of two runs that both find
  it expired, one takes it; the run that takes it over says so, naming the run it took it from;
- released by deleting it, only if it is still the holder's version (``If-Match``).

Expiry is judged by the clock of the node that reads the lock against the time the holder wrote:
clocks of the nodes must agree to well within the time to live (NTP does this).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from datetime import datetime, timezone

from probekit._io.storage import Storage
from probekit.errors import RunDirBusyError

__all__ = ["Lease", "LOCK_TTL_S", "lease_holder"]

LOCK_TTL_S = 120.0  # a dead run's lock is taken over this long after its last renewal
_now = time.time  # the clock expiry is judged by (a name of its own, for tests)


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _parse(data: bytes) -> dict:
    try:
        found = json.loads(data)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _expired(holder: dict, now: float) -> bool:
    exp = holder.get("expires")
    return not isinstance(exp, (int, float)) or exp < now  # an unreadable lock is a dead run's


def lease_holder(store: Storage, name: str = ".lock") -> dict | None:
    """Who holds the lock now, or None when nobody does (none there, or expired): for messages."""
    try:
        holder = _parse(store.read(name))
    except FileNotFoundError:
        return None
    return None if _expired(holder, _now()) else holder


def busy_message(where: str, who: dict) -> str:
    return (f"{where} is in use by another probekit run (pid {who.get('pid', '?')} on {who.get('host', '?')}, "
            f"started {who.get('started', '?')}). Wait for it to finish, or choose another --out; the lock of a "
            f"run that dies is taken over {who.get('ttl', LOCK_TTL_S):g} s after its last renewal "
            f"({_stamp(who['expires']) if isinstance(who.get('expires'), (int, float)) else '?'}).")


class Lease:
    """``.lock`` of a run directory in ``store``, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, store: Storage, name: str = ".lock", ttl: float | None = None):
        self.store, self.name = store, name
        self.ttl = float(LOCK_TTL_S if ttl is None else ttl)
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _stamp(_now()),
                   "run": uuid.uuid4().hex[:12], "ttl": self.ttl}
        self.tag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        now = _now()
        return json.dumps({**self.me, "renewed": _stamp(now), "expires": now + self.ttl}).encode()

    def acquire(self) -> None:
        """Take the lock, or take over an expired one (saying whose).

        Raises:
            RunDirBusyError: a live run holds it.
        """
        for _ in range(5):  # (a holder that releases between our two calls: try again)
            self.tag = self.store.create(self.name, self._body())
            if self.tag is not None:
                break
            try:
                data, tag = self.store.read_tagged(self.name)
            except FileNotFoundError:
                continue
            holder = _parse(data)
            if not _expired(holder, _now()):
                raise RunDirBusyError(busy_message(self.store.location, holder))
            self.tag = self.store.swap(self.name, self._body(), tag)
            if self.tag is None:  # another run took it over first
                continue
            warnings.warn(f"{self.store.location}: took over the lock of a run that stopped renewing it (pid "
                          f"{holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                          f"{holder.get('started', '?')}, last renewed {holder.get('renewed', '?')}); "
                          "its unfinished files are replaced by this run.", RuntimeWarning, stacklevel=4)
            break
        if self.tag is None:
            raise RunDirBusyError(f"{self.store.location}: its lock changed hands repeatedly while this run tried to "
                                  "take it; wait for the other runs, or choose another --out.")
        self._beat = threading.Thread(target=self._renew, name="probekit-lease", daemon=True)
        self._beat.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                tag = self.store.swap(self.name, self._body(), self.tag or "")
            except Exception:  # a network hiccup: try again at the next beat (the lock lasts 3 beats)
                continue
            if tag is None:  # taken over: this run no longer owns the directory
                self.lost = True
                return
            self.tag = tag

    def check(self) -> None:
        """Raise if this run lost its lock (another run took it over): it must not write its record.

        Raises:
            RunDirBusyError: the lock was taken over.
        """
        if self.lost:
            raise RunDirBusyError(f"{self.store.location}: this run's lock was taken over by another run (this run "
                                  f"could not renew it within {self.ttl:g} s); it stops without writing run.json. "
                                  "Run it again once the other run has finished.")

    def release(self) -> None:
        """Stop renewing and remove the lock (only if it is still this run's)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.tag is not None and not self.lost:
            try:
                self.store.delete(self.name, self.tag)
            except Exception:  # best effort: a lock left behind expires by itself
                pass
        self.tag = None
