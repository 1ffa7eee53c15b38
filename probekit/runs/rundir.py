"""A run directory: one run's files, the lock that keeps a second run out, and the record that
vouches for them.

Why: run directories are read (plots, reports, colleagues) while runs are interrupted, resumed
and repeated into them, so their files must always describe one run, and ``run.json`` must say
whether that run finished. A run therefore (1) takes the directory's lock, (2) marks
``run.json`` ``running`` under a new run id, (3) writes its outputs, and (4) writes ``run.json``
again LAST, with its final status and a manifest: the SHA-256 of every file it vouches for.
A reader trusts a directory only when ``run.json`` is finished and every file matches its
manifest, so an interrupted second run leaves ``running`` beside whatever it wrote, never an
earlier run's ``complete``. Figures are drawn into a staging folder and moved in only when all
of them are written: a full disk leaves no stray figure files.

A run never deletes or replaces a file that no probekit run wrote: ``--out`` on a folder that
holds files but no probekit run is refused before anything is written, and in a run directory
only the files that earlier runs' records list (``manifest``, and ``owned``: every file a run
wrote, recorded in ``run.json`` before the file is written) are replaced or removed; a user's
notes or figures beside them stay.

The directory may also be an S3 prefix (``s3://bucket/run``, also on S3-compatible servers):
:func:`probekit.runs.rundirs.open_run_dir` then makes a :class:`probekit.runs.remote.RemoteRunDir`,
which keeps these promises with the store's conditional writes (its module says how), and
:mod:`probekit.runs.rundirs`' ``read_record`` and ``load_run_dir`` read such a directory too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from pydantic import ValidationError

from probekit._io.atomic import atomic_path, write_errors, write_text_atomic
from probekit._io.fileid import file_digest
from probekit._io.storage import is_uri
from probekit.errors import RunDirBusyError, RunDirError
from probekit.results import COLUMNS, Results
from probekit.results.dataset import DatasetWriter, ResultsScan
from probekit.runs.parts import PartStore
from probekit.runs.record import RunRecord

__all__ = ["RunDir", "Renderer", "read_record", "load_run_dir", "write_outputs", "FINISHED", "STAMPS"]

RUN_JSON = "run.json"
RESULTS = "results.parquet"  # a folder of part files (probekit.results.dataset); a single file before issue 24
STAMPS = ".stamps.json"  # what a renderer writes beside the figures: the inputs each was drawn from
LOCK = ".lock"
OUTPUTS = ("results.parquet", "summary.csv", "arrays.npz", "contrasts.csv", "report.html")  # beside run.json
FINISHED = ("complete", "partial", "nonfinite")  # statuses of a run that wrote all its outputs


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str, sort_keys=False)


# -- the lock --------------------------------------------------------------------------------------
def _try_lock(fd: int) -> bool:
    """An exclusive lock on ``fd``'s file, released by the kernel when the process ends (however)."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


def _busy_message(path: Path, who: dict) -> str:
    return (f"{path} is in use by another probekit run (pid {who.get('pid', '?')} on "
            f"{who.get('host', '?')}, started {who.get('started', '?')}). Wait for it to finish, or "
            "choose another --out; a run that dies releases the lock by itself.")


def _lock_holder(path: Path) -> dict | None:
    """Who holds ``path``'s lock now, or None when nobody does (read-only: for messages)."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        return None if _try_lock(fd) else _holder(fd)
    finally:
        os.close(fd)


def _unlink_if_same(path: Path, fd: int) -> None:
    """Remove ``path`` if it is still the file open as ``fd`` (best effort: a lock file left behind
    is harmless, the next run takes it over)."""
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            path.unlink()
    except OSError:
        pass


# -- whose files -----------------------------------------------------------------------------------
def _is_record(record: Any) -> bool:
    """Whether JSON read from a ``run.json`` is a probekit run's record (not a list, not odd types)."""
    return isinstance(record, dict) and isinstance(record.get("run_id"), str) and isinstance(record.get("status"), str)


def _as_record(data: Any) -> RunRecord | None:
    """JSON read from a ``run.json`` as a :class:`RunRecord`, or None when it is not a probekit
    run's record (not a mapping with a run id and a status, or a value of the wrong type)."""
    if not _is_record(data):
        return None
    try:
        return RunRecord.model_validate(data)
    except ValidationError:
        return None


def _probekit_record(path: Path) -> RunRecord | None:
    """``run.json`` of ``path`` when it is a probekit run's record (read as JSON only), else None."""
    try:
        data = json.loads((path / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _as_record(data)


def _inside(name: Any) -> bool:
    """Whether ``name`` (from a record) is a relative path inside the run directory."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def owned_files(path: str | Path) -> set[str]:
    """The files of ``path`` that probekit runs wrote (the only ones a run may replace or remove).

    A folder that does not exist or is empty (or holds only what a run creates first: the lock
    and an empty ``parts/``) owns nothing yet; a run directory owns what its ``run.json`` lists.

    Raises:
        RunDirError: ``path`` is a folder with files but no probekit run record.
    """
    path = Path(path)
    if not path.is_dir():  # nothing there yet (or a file: creating the folder says so)
        return set()
    record = _probekit_record(path)
    if record is None:
        try:
            entries = list(path.iterdir())
        except OSError as exc:
            raise RunDirError(f"{path} cannot be listed ({exc.strerror}); choose another --out.") from None
        mine = all(p.name == LOCK or (p.name == "parts" and p.is_dir() and not any(p.iterdir())) for p in entries)
        if entries and not mine:
            raise RunDirError(
                f"{path} holds files but is not a probekit run directory (no run.json of a probekit run), and a "
                "run never deletes or replaces files it did not write: choose an empty or new folder for --out "
                "(or `out:` in the run file), or a previous probekit run directory.")
        return set()
    names = [*(record.owned or []), *(record.manifest or {}), *(record.figures or [])]
    if record.owned is None:  # written before runs recorded what they own: its output names are its own
        names += list(OUTPUTS)
    return {n for n in names if _inside(n) and os.path.lexists(path / n)}


# -- the directory -------------------------------------------------------------------------------
class Renderer(Protocol):
    """Draws a run's figures into a folder (:func:`probekit.views.plots.render_all`): returns the
    files it wrote or kept, and writes :data:`STAMPS` beside them."""

    def __call__(self, results: Results, out_dir: Path, *, reuse: Path, stamps: Path, kinds: list[str] | None = None,
                 metrics: list[str] | None = None) -> list[Path]: ...


class RunDir:
    """One run directory while a run writes it: ``with rd.locked(): rd.begin(record) ... rd.finish(...)``.

    ``path`` is where its files are written (for a directory in an object store, a local working
    folder whose files are uploaded); ``where`` is the directory as users name it (the path, or the URI).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where: str | Path = self.path
        self.parts = PartStore(self.path / "parts")
        self.outputs: list[str] = []  # files this run wrote, relative to the directory
        self.owned: set[str] = set()  # files a probekit run wrote here: the only ones a run may replace
        self.record: RunRecord | None = None  # run.json as this run keeps it (``owned`` is written as it grows)
        self._existed = True  # whether the folder was there before this run (set when the lock is taken)
        self._parts_existed = True
        self._previous: bytes | None = None  # run.json as the run before this one left it
        self._writer: DatasetWriter | None = None  # this run's results.parquet/ folder, once it writes rows

    @contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the directory's lock; a second run is refused with who holds it.

        A lock left by a process that died (SIGKILL, power loss) is free: the kernel drops it. The
        lock file is removed when the run ends, while still locked: a run that opened the file just
        before finds it unlinked once it gets the lock, and takes the lock of the new file instead.

        Raises:
            RunDirError: the folder holds files but no probekit run (nothing is written to it).
            RunDirBusyError: another run holds the lock.
            WriteError: the directory cannot be created or written.
        """
        owned_files(self.path)  # refuse a user's folder before creating anything in it
        self._existed, self._parts_existed = self.path.is_dir(), (self.path / "parts").is_dir()
        with write_errors(self.path):
            (self.path / "parts").mkdir(parents=True, exist_ok=True)
        fd = self._lock_fd()
        try:
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now()}).encode()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, me)
            self.owned = owned_files(self.path)  # (now that no other run can change them)
            yield self
        finally:
            try:
                _unlink_if_same(self.path / LOCK, fd)  # no .lock is left behind a finished run
            finally:
                os.close(fd)  # releases the lock

    def _lock_fd(self) -> int:
        """An open descriptor of ``.lock``, locked by this process (the file at that name now)."""
        while True:
            with write_errors(self.path):
                fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                who = _holder(fd)
                os.close(fd)
                raise RunDirBusyError(_busy_message(self.path, who))
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path / LOCK))
            except FileNotFoundError:  # its holder removed it as it finished: lock the next one
                same = False
            if same:
                return fd
            os.close(fd)

    def public(self, path: Path) -> Any:
        """Where users find a file this run wrote at ``path`` (itself, for a local directory)."""
        return path

    def undo(self) -> None:
        """Take back what this run wrote, when it has nothing to show (every model failed): a folder
        it created goes, with everything in it; in a folder that was there, ``run.json`` is put back
        as the run before left it (or removed if there was none) and a ``parts/`` it created and left
        empty goes. Best effort: what cannot be removed stays, and readers refuse it as an unfinished run."""
        if not self._existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        if self._previous is not None:
            with atomic_path(self.path / RUN_JSON) as tmp:
                tmp.write_bytes(self._previous)
        else:
            with write_errors(self.path):
                (self.path / RUN_JSON).unlink(missing_ok=True)
        parts = self.path / "parts"
        if not self._parts_existed and not any(p.is_file() for p in parts.rglob("*")):
            shutil.rmtree(parts, ignore_errors=True)

    def output(self, name: str) -> Path:
        """The path of an output file this run writes (``results.parquet``, ``report.html``...);
        the manifest will vouch for it.

        Raises:
            RunDirError: a file of that name is there and no probekit run wrote it.
        """
        self.own([name])
        if name not in self.outputs:
            self.outputs.append(name)
        return self.path / name

    def own(self, names: list[str]) -> None:
        """Record in ``run.json`` that this run writes ``names`` (before it writes them, so a run
        killed midway still names them); a file there that no probekit run wrote is refused.

        Raises:
            RunDirError: one of ``names`` exists and is not a probekit run's file.
        """
        new = [n for n in names if n not in self.owned]
        for n in new:
            if self._exists(n):
                raise RunDirError(f"{self._address(n)} was not written by probekit: move it out of {self.where} "
                                  "(a run never replaces a file it did not write), or choose another --out.")
        if new:
            self.owned.update(new)
            if self.record is not None:
                self.record.owned = sorted(self.owned)
                self.write_record(self.record)

    def _exists(self, name: str) -> bool:
        """Whether the directory holds ``name`` (a file, a folder or a link)."""
        return os.path.lexists(self.path / name)

    def _address(self, name: str) -> str:
        """``name`` as users know it, in messages."""
        return str(self.path / name)

    def remove(self, name: str) -> None:
        """Remove an output of an earlier run (only a file a probekit run wrote)."""
        if name in self.owned:
            (self.path / name).unlink(missing_ok=True)
            self.owned.discard(name)

    def adopt(self, record: RunRecord) -> None:
        """Go on writing the finished run whose ``record`` this is (``probekit plot``, ``report``)."""
        self.record = record

    def write_record(self, record: RunRecord) -> None:
        write_text_atomic(self.path / RUN_JSON, _json(record.model_dump()))

    def begin(self, record: RunRecord) -> RunRecord:
        """Mark the directory as written by a new run, before anything else is written."""
        self._previous = self._previous_record()
        record.run_id, record.status, record.started = uuid.uuid4().hex[:12], "running", now()
        record.owned = sorted(self.owned)
        record.manifest = None
        self.record = record
        self.write_record(record)
        return record

    def _previous_record(self) -> bytes | None:
        """``run.json`` as the run before this one left it (None: there was none)."""
        try:
            return (self.path / RUN_JSON).read_bytes()
        except OSError:
            return None

    def finish(self, record: RunRecord, status: str) -> None:
        """Write ``run.json`` last: the status, and for a finished run the manifest of its files."""
        record.status = status
        record.finished = now()
        record.owned = sorted(n for n in self.owned if os.path.lexists(self.path / n))
        if status in FINISHED:
            record.manifest = {name: file_digest(self.path / name) for name in self.outputs}
        self.write_record(record)

    def abandon(self, record: RunRecord, exc: BaseException) -> None:
        """Best effort after an error: say the run failed (on a full disk this may not be written;
        then ``running`` stays, which readers also refuse)."""
        record.error = f"{type(exc).__name__}: {exc}"
        try:
            self.finish(record, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        except OSError:
            pass

    # -- outputs -----------------------------------------------------------------------------
    def results_writer(self) -> DatasetWriter:
        """The writer of this run's ``results.parquet/`` folder (its part files, each recorded in
        ``owned`` before it is written). An earlier version's single ``results.parquet`` file, which
        a probekit run wrote, is removed first (a user's file of that name is refused)."""
        if self._writer is None:
            root = self.path / RESULTS
            if os.path.lexists(root) and not root.is_dir():
                self.own([RESULTS])  # refuses a file no probekit run wrote
                with write_errors(self.path):
                    self.remove(RESULTS)
            self._writer = DatasetWriter(root, own=lambda name: self.own([f"{RESULTS}/{name}"]))
        return self._writer

    def keep_rows(self, res: Results) -> Results:
        """Write ``res``'s rows into ``results.parquet/`` now (a part per model and metric) and give
        back ``res`` without them (its arrays and metadata kept): a run's rows never gather in memory."""
        src = res.source
        with write_errors(self.path):
            if src is not None and src._single and isinstance(res.meta.get("model"), str):
                # a cached part whose rows are still in its file: copied batch by batch
                self.results_writer().write_file(src.path, res.meta["model"])
                return Results(pd.DataFrame(columns=COLUMNS), res.arrays, res.meta)
            self.results_writer().write_results(res.table)
        # a new empty frame of the same columns: a slice (iloc[:0]) would keep the rows' buffers alive
        empty = pd.DataFrame({c: pd.Series([], dtype=t) for c, t in res.table.dtypes.items()})
        return Results._of_long_table(empty, res.arrays, res.meta)

    def results_of(self, res: Results) -> Results:
        """``res`` (arrays, metadata) over the rows this run wrote with :meth:`keep_rows`, read lazily."""
        writer = self.results_writer()
        return Results._lazy(ResultsScan.of_parts(writer.root, writer.parts, res.meta), res.arrays, res.meta)

    def _commit_results(self, results: Results) -> Results:
        """The index of ``results.parquet/`` (and any rows of ``results`` not written yet), each file
        in the manifest; parts an earlier run wrote here and this one did not are removed."""
        writer = self.results_writer()
        if results._scan is None or results._table is not None:  # rows in memory: write them now
            writer.parts = []
            with write_errors(self.path):
                writer.write_results(results.table)
            results = self.results_of(results)
        with write_errors(self.path):
            files = {f"{RESULTS}/{name}" for name in writer.commit(results.meta)}
            for name in sorted(files):
                self.output(name)
            for name in sorted(self.owned):  # stale parts (another model set, an interrupted run)
                if name.startswith(f"{RESULTS}/") and name not in files:
                    self.remove(name)
            _prune_empty(writer.root)
        return results

    def write_results(self, results: Results) -> None:
        """``results.parquet/`` (committed), ``summary.csv`` and ``arrays.npz`` (removed when there are no arrays)."""
        results = self._commit_results(results)
        summary = results.summary()
        write_text_atomic(self.output("summary.csv"), summary.to_csv(index=False, float_format="%.17g"))
        if results.arrays:
            results.save_arrays(self.output("arrays.npz"))
        else:
            with write_errors(self.path):
                self.remove("arrays.npz")

    def draw_figures(self, results: Results, render: Renderer | None, keep_others: bool = False,
                     **kwargs: Any) -> list[Path]:
        """Draw figures into a staging folder, then move them into ``figures/``: all or none.

        Without ``keep_others``, figures of earlier runs are removed (they describe other results).
        ``render`` draws them (:func:`probekit.views.plots.render_all`; None: no figures), with
        ``kwargs``; figures whose inputs did not change are linked from ``figures/`` instead of drawn
        again.

        Raises:
            WriteError and any error of the plotting code: then no new figure is left behind.
        """
        final = self.path / "figures"
        stage = self.path / f".figures-{uuid.uuid4().hex[:8]}"
        moved: list[Path] = []
        try:
            stamps = self.path / "parts" / "figure-stamps.json"  # what the figures in figures/ were drawn from
            drawn = render(results, stage, reuse=final, stamps=stamps, **kwargs) \
                if render is not None and kwargs.get("kinds") != [] else []
            self.own([f"figures/{p.name}" for p in drawn])  # refuses to replace a user's file
            with write_errors(final):
                final.mkdir(exist_ok=True)
                for p in drawn:
                    os.replace(p, final / p.name)
                    moved.append(final / p.name)
                if (stage / STAMPS).exists():  # last: only once every figure is in place
                    os.replace(stage / STAMPS, stamps)
        except BaseException:
            for p in moved:
                p.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if not keep_others and final.is_dir():  # an earlier run's figures, never a user's file
            for p in final.iterdir():
                if p.is_file() and p not in moved:
                    self.remove(f"figures/{p.name}")
        return [self.output(str(p.relative_to(self.path))) for p in moved]


def _prune_empty(root: Path) -> None:
    """Remove the empty ``model=``/``metric=`` folders that removed parts leave in ``root``."""
    for d in sorted((p for p in root.rglob("*=*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()  # only an empty folder
        except OSError:
            pass


def write_outputs(rd: RunDir, results: Results, record: RunRecord, figure_kinds: list[str] | None,
                  render: Renderer | None = None) -> list[Path]:
    """Everything a run writes from its Results and record (before :meth:`RunDir.finish`): the
    results, and the figures ``render`` draws of ``figure_kinds``.

    A figure error (a plotting bug, a full disk) costs no numbers: it is kept in
    ``record.figure_error`` and no figure of it is left; the results are written first.
    """
    rd.write_results(results)
    figs: list[Path] = []
    try:
        figs = rd.draw_figures(results, render, kinds=list(figure_kinds or []))
    except Exception as exc:
        record.figure_error = f"{type(exc).__name__}: {exc}"
        rd.draw_figures(results, None, kinds=[])  # no figure of an earlier run stays beside these results
    record.figures = [str(p.relative_to(rd.path)) for p in figs]
    return figs


# -- reading -------------------------------------------------------------------------------------
_AGAIN = "Run the comparison again into it to finish or rewrite it (finished parts are reused)."


def read_record(run_dir: str | Path) -> RunRecord:
    """``run.json`` of a finished run whose files all match its manifest.

    Raises:
        RunDirError: no run.json, an unfinished or interrupted run (its files may be an earlier
            run's), or a file that is missing or not the one the run wrote.
    """
    if is_uri(str(run_dir)):
        raise RunDirError(f"{run_dir} is an object-store run directory: open it with probekit.runs.rundirs.")
    run_dir = Path(run_dir)
    rj = run_dir / RUN_JSON
    if not run_dir.is_dir():
        raise RunDirError.absent(run_dir)
    if not rj.exists():
        what = "results.parquet but no run.json" if (run_dir / "results.parquet").exists() else "no run.json"
        raise RunDirError(f"{run_dir} has {what}: it is not a run directory written by a finished "
                          f"`probekit run` or `probekit compare`. {_AGAIN}")
    try:
        data = json.loads(rj.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{rj} cannot be read ({exc}). {_AGAIN}") from None
    record = _as_record(data)
    if record is None:  # JSON, but not a probekit run's record (a list, odd types)
        raise RunDirError(f"{rj} is not the record of a probekit run. {_AGAIN}")
    status, run_id = record.status, record.run_id
    if status not in FINISHED or record.manifest is None:
        who = _lock_holder(run_dir)
        if who:
            raise RunDirError(f"{run_dir} is being written by a run in progress (pid {who.get('pid')} on "
                              f"{who.get('host')}, started {who.get('started')}). Wait for it to finish.")
        raise RunDirError(f"{run_dir} holds an unfinished run (run.json status {status!r}, run {run_id}, started "
                          f"{record.started}): its files may come from an earlier run. {_AGAIN}")
    for name, digest in record.manifest.items():
        p = run_dir / name
        if not _inside(name):
            raise RunDirError(f"{rj} lists {name!r}, which is not a file of the run directory. {_AGAIN}")
        if not p.is_file():
            raise RunDirError(f"{p} is missing: run {run_id} wrote it. {_AGAIN}")
        if file_digest(p) != digest:
            raise RunDirError(f"{p} is not the file run {run_id} wrote (changed since). {_AGAIN}")
    return record


def load_run_dir(run_dir: str | Path) -> Results:
    """The results of a finished run directory, verified against its manifest.

    Raises:
        RunDirError: see :func:`read_record`.
    """
    if is_uri(str(run_dir)):
        raise RunDirError(f"{run_dir} is an object-store run directory: open it with probekit.runs.rundirs.")
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if (run_dir / RESULTS).is_dir():  # rows read when first used; summaries from per-part moments
        scan = ResultsScan(run_dir / RESULTS)
        res = Results._lazy(scan, meta=scan.meta)
    else:  # a single file, as runs before issue 24 wrote it
        res = Results.read_parquet(run_dir / RESULTS)
    if "arrays.npz" in (record.manifest or {}):
        res.arrays = Results.read_arrays(run_dir / "arrays.npz", models=res.models)
    return res
