"""The files a plugin is made of, and one digest over them: what a cached part is keyed on.

A plugin's numbers come from every file of its distribution, not only from the module that
defines its class: a helper module, the model definition, bundled weights or tables. A fix in
any of them must change the part key, even when the version does not change (an editable
install fixed in place, ``pip install --upgrade`` of the same version). A plugin is its:

- installed distribution (a wheel): every file its ``RECORD`` lists, pip's own list of what
  it installed (byte-code caches and the ``.dist-info`` folder aside);
- otherwise (an editable install, a source checkout, a class registered in a session): the
  package tree of its module, every file under each package directory of the module's import
  path (``__pycache__``, byte code and hidden files aside); a module outside any package is
  its own file.

Built-in plugins are part of probekit, so their key follows probekit's own files.

Content-true and cheap: each file's SHA-256 comes from :func:`probekit._io.fileid.file_digest`
(remembered per process under the file's device, inode, size, mtime and ctime), and the
digest of a whole plugin is remembered under the stamps of all its files, so asking again
costs one ``stat`` per file.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import sys
import time
from importlib import metadata
from pathlib import Path

from probekit._io.fileid import file_digest

__all__ = ["plugin_files", "files_digest"]

_SETTLED_NS = 3 * 10**9  # as in fileid: a stamp younger than this may not show a second write
_memo: dict[tuple, str] = {}  # the stamps of every file of a plugin -> their digest


def _skipped(name: str) -> bool:
    """Caches and editor leftovers, which change without the plugin changing."""
    return name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", ".pyo", "~"))


@functools.lru_cache(maxsize=256)
def source_file(cls: type) -> Path | None:
    """The file that defines ``cls`` (None for a class typed into a session); where a class was
    loaded from does not change while it lives."""
    try:
        src = inspect.getsourcefile(cls)
    except TypeError:  # its module is not in sys.modules (loaded from a path): ask its functions
        codes = [f.__code__ for f in vars(cls).values() if hasattr(f, "__code__")]
        src = codes[0].co_filename if codes else None
    return Path(src).resolve() if src and Path(src).is_file() else None


def _record_files(dist: metadata.Distribution | None) -> dict[str, str] | None:
    """``{RECORD entry: path}`` of an installed distribution; None without a RECORD (egg-info, none)."""
    if dist is None or dist.read_text("RECORD") is None:
        return None
    out = {}
    for f in dist.files or []:
        if any(part.endswith(".dist-info") or _skipped(part) for part in f.parts):
            continue
        out[str(f)] = str(Path(str(dist.locate_file(f))).resolve())  # typeshed: a SimplePath, not PathLike
    return out


def _package_roots(module: str) -> tuple[Path, ...]:
    """The directories of the packages on ``module``'s import path, outermost only."""
    parts = module.split(".")
    found = []
    for i in range(1, len(parts) + 1):
        for d in getattr(sys.modules.get(".".join(parts[:i])), "__path__", None) or []:
            if Path(d).is_dir():
                found.append(Path(d).resolve())
    roots: list[Path] = []
    for r in sorted(set(found), key=lambda p: len(p.parts)):
        if not any(r.is_relative_to(o) for o in roots):
            roots.append(r)
    return tuple(roots)


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` as ``{"<root name>/<relative path>": path}`` (symlinked folders not
    followed). Plain strings: this runs for every part key, and pathlib would triple its cost."""
    out, todo, cut = {}, [str(root)], len(str(root)) + 1
    while todo:
        folder = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if _skipped(e.name):
                continue
            if e.is_dir(follow_symlinks=False):
                todo.append(e.path)
            elif e.is_file():
                out[f"{root.name}/{e.path[cut:]}".replace(os.sep, "/")] = e.path
    return out


def plugin_files(cls: type, dist: metadata.Distribution | None = None) -> dict[str, str]:
    """``{stable name: path}`` of every file that makes the plugin ``cls`` (see the module docstring).

    Args:
        cls: the adapter or metric class.
        dist: the distribution whose entry point registered it (None: registered in a session).
    """
    src = source_file(cls)
    record = _record_files(dist)
    if record is not None and src is not None and str(src) in set(record.values()):
        return record  # installed: what pip installed, inside or outside the package
    out: dict[str, str] = {}
    for root in _package_roots(cls.__module__):
        out.update(_tree(root))
    if not out and src is not None:  # a module outside any package
        out[src.name] = str(src)
    return out


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def files_digest(files: dict[str, str]) -> str | None:
    """One SHA-256 over ``{name: path}`` (names and contents); None for no files.

    Remembered under every file's stamp while none of them changes (see :mod:`probekit._io.fileid`).
    """
    if not files:
        return None
    names = sorted(files)
    stamps = tuple((n, _stamp(files[n])) for n in names)
    if stamps in _memo:
        return _memo[stamps]
    h = hashlib.sha256()
    for name, stamp in stamps:
        try:
            digest = file_digest(files[name]) if stamp is not None else "missing"
        except OSError:
            digest = "unreadable"
        h.update(f"{name}\0{digest}\n".encode())
    out = h.hexdigest()
    now = time.time_ns()
    if all(s is not None and now - s[4] > _SETTLED_NS for _, s in stamps):
        _memo[stamps] = out
    return out
