"""Content identity of files: what a cached part may be keyed on.

A part is reused only if the files it was computed from are the same, so the identity of a
file is its content: SHA-256 over every byte, whatever the size. Names, sizes and times are
not identity (a same-size replacement keeps the size; ``cp -p`` and ``touch -r`` keep the
time), so they only decide when a file must be hashed again: a digest is remembered, per
process, under the file's device, inode, size, mtime and ctime. The kernel sets ctime on every
write, rename or ``utime`` and no user call can set it back, so a remembered digest is never
served for changed content. As git does for "racily clean" files, a digest is remembered only
for a file whose ctime is a few seconds old: two writes within one tick of the file system's
clock can leave every stamp equal. Files that the Hugging Face cache stores by content (``blobs/<sha256>``)
are identified by that name without reading them.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

__all__ = ["file_digest", "file_digest_head", "files_identity"]

_CHUNK = 1 << 20
_HEAD = 16  # leading bytes kept with a digest: enough to tell a file's format
_memo: dict[tuple, tuple[str, bytes]] = {}
_HF_BLOB = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")  # git blob sha1 or LFS sha256
_SETTLED_NS = 3 * 10**9  # a ctime older than this is past any file system's timestamp granularity


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the file's content; remembered while the file is untouched.

    Raises:
        OSError: the file cannot be read.
    """
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HF_BLOB.match(real.name):
        return real.name  # the Hugging Face cache names blobs by content (LFS SHA-256, git SHA-1)
    return _read(real)[0]


def file_digest_head(path: str | os.PathLike) -> tuple[str, bytes]:
    """:func:`file_digest` and the file's first 16 bytes (its format's magic number), from one read.

    Raises:
        OSError: the file cannot be read.
    """
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HF_BLOB.match(real.name):
        with open(real, "rb") as f:
            return real.name, f.read(_HEAD)
    return _read(real)


def _read(real: Path) -> tuple[str, bytes]:
    with open(real, "rb") as f:
        st = os.fstat(f.fileno())
        key = _stamp(st)
        if key in _memo:
            return _memo[key]
        h = hashlib.sha256()
        head = b""
        while chunk := f.read(_CHUNK):
            head = head or chunk[:_HEAD]
            h.update(chunk)
    found = h.hexdigest(), head
    if time.time_ns() - st.st_ctime_ns > _SETTLED_NS:
        _memo[key] = found
    return found


def files_identity(paths: list[Path]) -> dict[str, str]:
    """``{path: sha256}`` for files that exist; ``{path: "missing"}`` for those that do not."""
    out = {}
    for p in paths:
        p = Path(p)
        out[str(p)] = file_digest(p) if p.is_file() else "missing"
    return out
