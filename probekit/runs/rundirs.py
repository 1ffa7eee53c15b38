"""A run directory by where it is: a folder (:mod:`probekit.runs.rundir`) or an object-store prefix
such as ``s3://bucket/run`` (:mod:`probekit.runs.remote`, which builds on the folder kind).

What takes a user's ``--out`` or RUN_DIR opens it here, so neither kind imports the other's
dispatch (the folder kind knows nothing of object stores).
"""

from __future__ import annotations

from pathlib import Path

from probekit._io.storage import is_uri
from probekit.results import Results
from probekit.runs import rundir
from probekit.runs.record import RunRecord

__all__ = ["open_run_dir", "read_record", "load_run_dir"]


def open_run_dir(where: str | Path) -> rundir.RunDir:
    """The run directory at ``where``: a :class:`~probekit.runs.remote.RemoteRunDir` for an ``s3://`` URI,
    else a :class:`~probekit.runs.rundir.RunDir` on the folder."""
    if is_uri(str(where)):
        from probekit.runs.remote import RemoteRunDir

        return RemoteRunDir(str(where))
    return rundir.RunDir(where)


def read_record(where: str | Path) -> RunRecord:
    """:func:`probekit.runs.rundir.read_record` of a folder, or of an ``s3://`` run directory."""
    if is_uri(str(where)):
        from probekit.runs import remote

        return remote.read_record(str(where))
    return rundir.read_record(where)


def load_run_dir(where: str | Path) -> Results:
    """:func:`probekit.runs.rundir.load_run_dir` of a folder, or of an ``s3://`` run directory."""
    if is_uri(str(where)):
        from probekit.runs import remote

        return remote.load_run_dir(str(where))
    return rundir.load_run_dir(where)
