"""A run directory in an object store (``--out s3://bucket/prefix``): the same files and the same
promises as a local one (:mod:`probekit.runs.rundir`), kept with conditional writes.

How, in the order a run writes (the protocol: :mod:`probekit._io.storage` for the writes):

- the lock is a lease object, ``.lock``, taken create-only and renewed by compare-and-swap
  (:mod:`probekit.runs.lease`); a second run is refused with who holds it, and a dead run's lock
  is taken over once it expires;
- parts are written straight to ``parts/`` in the store, each file a whole object, the seal last
  (a part without a matching seal is recomputed, as locally);
- outputs (results, summary, report, figures) are written into a local working folder, where
  writers and figure code work on files as they do for a local run, and uploaded before the next
  ``run.json`` is written; figures are drawn there and uploaded;
- ``run.json`` is the commit: written last with the manifest of SHA-256s, and each write is a
  compare-and-swap over the version this run wrote before (``If-Match``), so a run that lost its
  lock can never overwrite the record of the run that took it over.

A run never deletes or replaces an object it did not write: a prefix that holds objects but no
probekit run is refused, and only names the records list (``owned``, ``manifest``) are replaced;
objects beside the run prefix are never listed or touched. Reading (:func:`read_record`,
:func:`load_run_dir`) checks every file against the manifest, as for a local directory.

Limits: the results dataset, figures and report are staged in the local working folder (a run needs
local disk for its results), and reading a run back copies the files its manifest lists into a
local temporary folder (read in pieces and hashed as they come); rows are never all in memory, but
the local disk holds them. Only the driver touches the store (Ray replicas hand their rows to it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from probekit._io.fileid import file_digest
from probekit._io.storage import Storage, storage_for
from probekit.errors import RunDirError
from probekit.results import Results
from probekit.runs.lease import Lease, lease_holder
from probekit.runs.parts import _PART_FORMAT, PartStore, _plausible_meta
from probekit.runs.record import RunRecord
from probekit.runs.rundir import _AGAIN, FINISHED, LOCK, OUTPUTS, RUN_JSON, RunDir, _as_record, _inside, _json, now

__all__ = ["RemoteRunDir", "StoredParts", "read_record", "load_run_dir", "owned_names"]

_EXPLORER = "parts/explorer"  # the report's explorer arrays: kept in the store, read from the working folder


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _stat(path: Path) -> tuple:
    """What tells one version of a local file from the next (writes here are new files, renamed in)."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


class StoredParts(PartStore):
    """``parts/`` of a run directory in a store; ``folder`` is the local working copy (explorer arrays)."""

    def __init__(self, store: Storage, folder: Path):
        super().__init__(folder)
        self.store = store

    def read(self, key: str, rows: bool = True) -> Results | None:
        """The part under ``key``, or None if it is absent or fails its seal (then it is recomputed);
        its rows are read whatever ``rows`` says (the downloaded copy is not kept)."""
        try:
            sums = json.loads(self.store.read(f"{key}.seal.json"))["files"]
            with tempfile.TemporaryDirectory(prefix="probekit-part-") as tmp:
                for name in (f"{key}.parquet", f"{key}.npz"):
                    if name not in sums:
                        if self.store.exists(name):
                            return None
                        continue
                    data = self.store.read(name)
                    if _sha(data) != sums[name]:
                        return None
                    (Path(tmp) / name).write_bytes(data)
                res = Results.read_parquet(Path(tmp) / f"{key}.parquet")
                if not _plausible_meta(res.meta):
                    return None
                if f"{key}.npz" in sums:
                    res.arrays = Results.read_arrays(Path(tmp) / f"{key}.npz", models=[res.meta["model"], *res.models])
        except Exception:  # absent, damaged or unreadable: recompute, never trust
            return None
        return res

    def write(self, key: str, res: Results) -> None:
        """Upload a part: its files first, the seal with their checksums last (the seal marks it done)."""
        self.store.delete(f"{key}.seal.json")
        sums = {}
        with tempfile.TemporaryDirectory(prefix="probekit-part-") as tmp:
            if res.arrays:
                res.save_arrays(Path(tmp) / "a.npz")
                sums[f"{key}.npz"] = file_digest(Path(tmp) / "a.npz")
                self.store.upload(f"{key}.npz", Path(tmp) / "a.npz")
            else:
                self.store.delete(f"{key}.npz")
            res.to_parquet(Path(tmp) / "t.parquet")
            sums[f"{key}.parquet"] = file_digest(Path(tmp) / "t.parquet")
            self.store.upload(f"{key}.parquet", Path(tmp) / "t.parquet")
        self.store.put(f"{key}.seal.json", json.dumps({"format": _PART_FORMAT, "files": sums}).encode())

    def write_joined(self, key: str, sources: list[str], res: Results) -> None:
        """As :meth:`PartStore.write_joined`: the sources are copied here, joined in a local folder,
        and the joined part uploaded, its seal last."""
        with tempfile.TemporaryDirectory(prefix="probekit-part-") as tmp:
            local = PartStore(Path(tmp))
            for k in sources:
                self.store.download(f"{k}.parquet", Path(tmp) / f"{k}.parquet")
            local.write_joined(key, sources, res)
            self.store.delete(f"{key}.seal.json")
            for name in (f"{key}.npz", f"{key}.parquet"):
                if (Path(tmp) / name).exists():
                    self.store.upload(name, Path(tmp) / name)
                else:
                    self.store.delete(name)
            self.store.upload(f"{key}.seal.json", Path(tmp) / f"{key}.seal.json")

    def discard(self, key: str) -> None:
        """Remove a part (seal first, so a half-removed part is never served)."""
        for name in (f"{key}.seal.json", f"{key}.parquet", f"{key}.npz"):
            self.store.delete(name)


def _record_of(store: Storage) -> tuple[RunRecord | None, bytes | None, str | None]:
    """``run.json`` of the store as a record (None when it is not a probekit run's), its bytes and tag."""
    try:
        data, tag = store.read_tagged(RUN_JSON)
    except FileNotFoundError:
        return None, None, None
    try:
        found = json.loads(data)
    except ValueError:
        return None, data, tag
    return _as_record(found), data, tag


def owned_names(store: Storage) -> set[str]:
    """The objects of the run prefix that probekit runs wrote (see :func:`probekit.runs.rundir.owned_files`).

    Raises:
        RunDirError: the prefix holds objects but no probekit run record.
    """
    names = store.list()
    record = _record_of(store)[0]
    if record is None:
        if [n for n in names if n != LOCK]:
            raise RunDirError(
                f"{store.location} holds objects but is not a probekit run directory (no run.json of a probekit "
                "run), and a run never deletes or replaces files it did not write: choose an empty or new prefix "
                "for --out (or `out:` in the run file), or a previous probekit run directory.")
        return set()
    listed = [*(record.owned or []), *(record.manifest or {}), *(record.figures or [])]
    if record.owned is None:
        listed += list(OUTPUTS)
    have = set(names)
    return {n for n in listed if _inside(n) and n in have}


class _Folder:
    """A local folder that is removed once nothing refers to this object (the run directory while
    it is locked, and every Results whose rows are read from the folder)."""

    def __init__(self, path: Path):
        self.path = path
        weakref.finalize(self, shutil.rmtree, path, True)


class RemoteRunDir(RunDir):
    """A run directory in an object store while a run writes it (for an ``s3://`` URI,
    :func:`probekit.runs.rundirs.open_run_dir` makes one).

    ``path`` is the local working folder (outputs and figures are written there, then uploaded);
    ``where`` is the store's address.
    """

    def __init__(self, where: str | Path):
        self.store = storage_for(str(where))
        super().__init__(Path(tempfile.gettempdir()) / f"probekit-run-{uuid.uuid4().hex[:12]}")
        self.where = self.store.location
        self.parts = StoredParts(self.store.child("parts"), self.path / "parts")
        self._lease: Lease | None = None
        self._tag: str | None = None  # the version of run.json this run read or wrote last
        self._sent: dict[str, tuple] = {}  # local file -> the stat of the version uploaded (a write is a new file)
        self._folder: _Folder | None = None  # the working folder, kept while a Results reads its rows from it

    def public(self, path: Path) -> Any:
        """The store address of a file written into the working folder."""
        return self.store.uri(path.relative_to(self.path).as_posix())

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the directory's lease (:mod:`probekit.runs.lease`); the working folder lives as long.

        Raises:
            RunDirError: the prefix holds objects but no probekit run (nothing is written to it).
            RunDirBusyError: another run holds the lock.
        """
        owned_names(self.store)  # refuse a user's prefix before creating anything in it
        present = [n for n in self.store.list() if n != LOCK]
        self._existed, self._parts_existed = bool(present), any(n.startswith("parts/") for n in present)
        self._lease = Lease(self.store, LOCK)
        self._lease.acquire()
        try:
            self._folder = _Folder(self.path)
            (self.path / "parts").mkdir(parents=True, exist_ok=True)
            self.owned = owned_names(self.store)  # (now that no other run can change them)
            for name in self.store.list(_EXPLORER):  # the report reads cached explorer arrays from here
                self.store.download(name, self.path / name)
                self._sent[name] = _stat(self.path / name)
            yield self
        finally:
            try:
                self._lease.release()
            finally:
                self._folder = None  # (removed now, or when the last Results reading from it goes)

    def results_of(self, res: Results) -> Results:
        """As :meth:`RunDir.results_of`: the rows are read from the working folder, which stays as long
        as the Results does (``pk.compare``'s results are read after the run)."""
        out = super().results_of(res)
        vars(out)["_rows_folder"] = self._folder
        return out

    def _exists(self, name: str) -> bool:
        return self.store.exists(name)

    def _address(self, name: str) -> str:
        return self.store.uri(name)

    def remove(self, name: str) -> None:
        if name in self.owned:
            self.store.delete(name)
            self._sent.pop(name, None)
        super().remove(name)  # the working folder's copy, and the owned list

    def _upload(self) -> None:
        """Upload what this run wrote into the working folder since the last upload (outputs, figures,
        explorer arrays; a folder output file by file)."""
        names = list(self.outputs)
        if (self.path / _EXPLORER).is_dir():
            names += [p.relative_to(self.path).as_posix() for p in (self.path / _EXPLORER).iterdir()]
        for name in names:
            p = self.path / name
            files = [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else [p] if p.is_file() else []
            for q in files:
                rel = q.relative_to(self.path).as_posix()
                stamp = _stat(q)
                if self._sent.get(rel) != stamp:
                    self.store.upload(rel, q)
                    self._sent[rel] = stamp

    def write_record(self, record: RunRecord) -> None:
        """Upload the outputs written so far, then ``run.json`` by compare-and-swap over this run's last version.

        Raises:
            RunDirBusyError: this run lost its lock.
            RunDirError: run.json changed under this run.
        """
        if self._lease is not None:
            self._lease.check()
        self._upload()
        body = _json(record.model_dump()).encode()
        tag = self.store.create(RUN_JSON, body) if self._tag is None else self.store.swap(RUN_JSON, body, self._tag)
        if tag is None:
            raise RunDirError(f"{self.store.uri(RUN_JSON)} was changed by someone else while this run held the "
                              "lock; this run stops without overwriting it. Run it again.")
        self._tag = tag

    def adopt(self, record: RunRecord) -> None:
        super().adopt(record)
        self._tag = _record_of(self.store)[2]  # (its next write swaps over the version read now)

    def _previous_record(self) -> bytes | None:
        _, previous, self._tag = _record_of(self.store)  # (this run's first write swaps over that version)
        return previous

    def finish(self, record: RunRecord, status: str) -> None:
        record.status = status
        record.finished = now()
        self._upload()
        present = set(self.store.list())
        record.owned = sorted(n for n in self.owned if n in present)
        if status in FINISHED:
            manifest = {}
            for name in self.outputs:
                p = self.path / name
                manifest[name] = file_digest(p) if p.is_file() else _sha(self.store.read(name))
            record.manifest = manifest
        self.write_record(record)

    def abandon(self, record: RunRecord, exc: BaseException) -> None:
        """As :meth:`RunDir.abandon`; a run that lost its lock leaves run.json to the run that took it."""
        if self._lease is not None and self._lease.lost:
            return
        try:
            super().abandon(record, exc)
        except RunDirError:  # (run.json changed under it: the error being raised says more)
            pass

    def undo(self) -> None:
        """Take back what this run wrote when it has nothing to show (see :meth:`RunDir.undo`)."""
        if not self._existed:  # the prefix was empty before this run: all of it is this run's
            for name in self.store.list():
                if name != LOCK:
                    self.store.delete(name)
            return
        if self._previous is not None and self._tag is not None:
            self._tag = self.store.swap(RUN_JSON, self._previous, self._tag) or self._tag
        elif self._tag is not None:
            self.store.delete(RUN_JSON, self._tag)

    def draw_figures(self, results: Results, render: Any, keep_others: bool = False, **kwargs: Any) -> list[Path]:
        """Draw figures in the working folder (they are uploaded with the next record); without
        ``keep_others``, figures of earlier runs in the store are removed."""
        paths = super().draw_figures(results, render, keep_others=keep_others, **kwargs)
        if not keep_others:
            drawn = {p.relative_to(self.path).as_posix() for p in paths}
            for name in self.store.list("figures"):
                if name not in drawn:
                    self.remove(name)  # (only a probekit run's figure)
        return paths


# -- reading -------------------------------------------------------------------------------------
def read_record(where: str, _copy: Path | None = None) -> RunRecord:
    """``run.json`` of a finished run in a store whose files all match its manifest (see
    :func:`probekit.runs.rundir.read_record`; the files are read once, in pieces, and copied
    into the folder ``_copy`` when given).

    Raises:
        RunDirError: as the local function says.
    """
    store = storage_for(where)
    rj = store.uri(RUN_JSON)
    try:
        data = store.read(RUN_JSON)
    except FileNotFoundError:
        if not store.list():
            raise RunDirError.absent(store.location) from None
        raise RunDirError(f"{store.location} has no run.json: it is not a run directory written by a finished "
                          f"`probekit run` or `probekit compare`. {_AGAIN}") from None
    try:
        record = _as_record(json.loads(data))
    except ValueError as exc:
        raise RunDirError(f"{rj} cannot be read ({exc}). {_AGAIN}") from None
    if record is None:
        raise RunDirError(f"{rj} is not the record of a probekit run. {_AGAIN}")
    if _copy is not None:
        (_copy / RUN_JSON).write_bytes(data)
    if record.status not in FINISHED or record.manifest is None:
        who = lease_holder(store, LOCK)
        if who:
            raise RunDirError(f"{store.location} is being written by a run in progress (pid {who.get('pid')} on "
                              f"{who.get('host')}, started {who.get('started')}). Wait for it to finish.")
        raise RunDirError(f"{store.location} holds an unfinished run (run.json status {record.status!r}, run "
                          f"{record.run_id}, started {record.started}): its files may come from an earlier run. "
                          f"{_AGAIN}")
    for name, digest in record.manifest.items():
        if not _inside(name):
            raise RunDirError(f"{rj} lists {name!r}, which is not a file of the run directory. {_AGAIN}")
        try:
            found = store.digest(name) if _copy is None else store.download(name, _copy / name)
        except FileNotFoundError:
            raise RunDirError(f"{store.uri(name)} is missing: run {record.run_id} wrote it. {_AGAIN}") from None
        if found != digest:
            raise RunDirError(f"{store.uri(name)} is not the file run {record.run_id} wrote (changed since). {_AGAIN}")
    return record


def load_run_dir(where: str) -> Results:
    """The results of a finished run directory in a store, verified against its manifest.

    The files the manifest vouches for are read once (in pieces), checked, and kept in a local
    temporary copy that the returned Results reads its rows from (removed when the Results is dropped).

    Raises:
        RunDirError: see :func:`read_record`.
    """
    copy = Path(tempfile.mkdtemp(prefix="probekit-read-"))
    try:
        read_record(where, copy)
        from probekit.runs.rundir import load_run_dir as load_local

        res = load_local(copy)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    weakref.finalize(res, shutil.rmtree, copy, True)
    return res
