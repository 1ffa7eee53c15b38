"""Atomic file writes: a file is either the old one or the whole new one, never half written.

Run directories are read while runs are interrupted and resumed; a reader must never see a
truncated parquet, figure or JSON file. A write that fails because of where it writes (a full
disk, no permission, a read-only file system) becomes one :class:`~probekit.errors.WriteError`
that says what to do; removing the temporary file never hides the error that stopped the write.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from probekit.errors import WriteError

__all__ = ["atomic_path", "write_text_atomic", "write_errors"]

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR}  # EEXIST: --out is a file


def _message(exc: OSError, path: Path) -> str | None:
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        return (f"No space left to write {path} ({reason}). Free some space or choose another output "
                "directory (--out), then run the same command again: finished parts are kept.")
    if exc.errno in _NOT_ALLOWED:
        return (f"Cannot write {path} ({reason}). Choose a writable output directory (--out), or "
                "fix the folder's permissions.")
    return None


@contextmanager
def write_errors(path) -> Iterator[None]:
    """Turn a full disk or a refused write inside the block into a :class:`WriteError` about ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        msg = _message(exc, Path(path))
        if msg is None:
            raise
        raise WriteError(msg) from exc


def _discard(tmp: Path) -> None:
    """Remove a temporary file; a failure here must never replace the error being raised."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` if the block succeeds.

    ``suffix`` ends the temporary name, for writers that choose a format from the extension
    (matplotlib) or append one (NumPy's ``.npz``). On an error the temporary file is removed.

    Raises:
        WriteError: the disk is full or the place is not writable (the message says what to do).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    with write_errors(path):
        try:
            yield tmp
            tmp.replace(path)
        except BaseException:
            _discard(tmp)
            raise


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
