"""The error family of probekit.

Every error says what was given, what is allowed and what to do next. The CLI turns
these into one short line (tracebacks only with ``PROBEKIT_DEBUG=1``); anything that is
not a :class:`ProbekitError` is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

__all__ = [
    "ProbekitError",
    "UnknownNameError",
    "PluginLoadError",
    "PluginClashError",
    "LayoutError",
    "WeightsUnavailableError",
    "UnsupportedArchitectureError",
    "ImageError",
    "ConfigError",
    "MissingDependencyError",
    "WriteError",
    "RunDirError",
    "RunDirBusyError",
    "close_matches",
    "describe_type",
    "reading_checkpoint",
    "refusing_pickles",
]


class ProbekitError(Exception):
    """Base class of every error probekit raises on purpose."""


def describe_type(tp: Any) -> str:
    """A short human description of an option type: ``bool (true or false)``, ``one of 'px', 'patch'``."""
    while typing.get_origin(tp) is typing.Annotated:  # Annotated[T, ...] -> T
        tp = typing.get_args(tp)[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "bool (true or false, unquoted)"
    if tp is int:
        return "int"
    if tp is float:
        return "float (a number)"
    if tp is str:
        return "str"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        return " or ".join("None" if a is type(None) else describe_type(a) for a in args)
    if origin in (tuple, list):
        inner = describe_type(args[0]) if args else "values"
        return f"a list of {inner}"
    return getattr(tp, "__name__", str(tp))


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names from ``candidates`` that look like ``name`` (difflib, then substrings)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(found) < n:
        low = name.lower()
        found += [c for c in candidates if low in c.lower() and c not in found][: n - len(found)]
    return found


class UnknownNameError(ProbekitError, KeyError):
    """A model, adapter, metric or alias that is not registered, with close names."""

    def __init__(self, kind: str, name: str, candidates: Iterable[str], hint: str = ""):
        self.kind, self.name = kind, name
        self.suggestions = close_matches(name, candidates)
        msg = f"Unknown {kind} {name!r}."
        if self.suggestions:
            msg += " Did you mean: " + ", ".join(repr(s) for s in self.suggestions) + "?"
        if hint:
            msg += " " + hint
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginLoadError(ProbekitError):
    """A plugin's entry point failed to import or gave something that is not a plugin."""

    def __init__(self, display_name: str, cause: BaseException | str, *, kind: str = "plugin",
                 install: str | None = None):
        self.display_name, self.cause, self.kind = display_name, cause, kind
        if install is not None:  # a missing dependency: say what to install, in one line
            module = getattr(cause, "name", None) or cause
            msg = (f"The {kind} plugin {display_name} needs the Python module {module!r}, which is not "
                   f"installed. Install it: {install} (or uninstall that plugin); other plugins are unaffected.")
        else:
            msg = (f"Error loading {kind} plugin {display_name}: {cause!s}. Fix or uninstall that "
                   "distribution; other plugins are unaffected.")
        super().__init__(msg)


class PluginClashError(ProbekitError, ValueError):
    """Two plugins claim the same name."""


class LayoutError(ProbekitError, ValueError):
    """A token layout that does not match the tokens the model produced."""


class WeightsUnavailableError(ProbekitError):
    """Pretrained weights that are not on this machine and cannot be downloaded now.

    ``random_init``: whether a random-init control (``pretrained=False``) is possible for this
    model, so the CLI offers ``--no-pretrained`` only where it would work (not for an ONNX graph).
    """

    def __init__(self, message: str, *, random_init: bool = True):
        self.random_init = random_init
        super().__init__(message)


class UnsupportedArchitectureError(ProbekitError, TypeError):
    """A model no adapter understands, or a metric whose meaning the model's attention lacks."""


class ImageError(ProbekitError, ValueError):
    """Images that cannot be read, or an image set that is empty."""


class ConfigError(ProbekitError, ValueError):
    """A run file or option with a bad value."""


class MissingDependencyError(ProbekitError, ImportError):
    """An optional library a backend needs is not installed; the message names the extra."""


class WriteError(ProbekitError, OSError):
    """A file probekit writes cannot be written: a full disk, no permission, a read-only place."""


class RunDirError(ProbekitError):
    """A run directory whose files do not describe one finished run (interrupted, mixed from two
    runs, or edited since)."""

    @classmethod
    def absent(cls, path: Any) -> RunDirError:
        """The error for a run directory that is not there (a typo in ``probekit plot``'s argument)."""
        return cls(f"No run directory at {path}. Point at a directory written by `probekit run` or "
                   "`probekit compare`.")


class RunDirBusyError(RunDirError):
    """Another probekit run holds the run directory's lock."""


@contextmanager
def reading_checkpoint(path) -> Iterator[None]:
    """Around a library reading a user's ``checkpoint=`` file: any failure is that file's fault
    (garbage bytes, another architecture's tensors), said in one line. A no-op when ``path`` is None."""
    if path is None:
        yield
        return
    try:
        yield
    except ProbekitError:
        raise
    except Exception as exc:
        if refused_pickle(exc):
            raise ConfigError(pickle_refused(f"checkpoint={str(path)!r}", exc)) from None
        first = _torch_reason(exc)
        raise ConfigError(
            f"checkpoint={str(path)!r} cannot be loaded ({type(exc).__name__}: {first}). Give a weights file "
            "saved from this architecture: a state dict in .safetensors, .pth or .bin."
        ) from exc


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from (a library wraps torch's error in its own)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _weights_only_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``weights_only=True`` load refusing a file, torch's or a library's
    wrapping it (their texts advise loading with ``weights_only`` off, which runs the file's code:
    never shown)."""
    import pickle

    return any(isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e)
               or "weights_only" in str(e) for e in _chain(exc))


def refused_pickle(exc: BaseException) -> bool:
    """Whether ``exc`` is torch refusing, under ``weights_only=True``, a pickle that holds more than
    tensors: one that asks for a class or a function (code that would run if it were loaded). Bytes
    that are no pickle at all (garbage, a truncated file) fail too, but ask for nothing."""
    return _weights_only_failure(exc) and any("GLOBAL " in str(e) or "Unsupported global" in str(e)
                                              for e in _chain(exc))


def _torch_reason(exc: BaseException) -> str:
    """The reason in a loader's error, one line of at most 200 characters; for a weights-only
    refusal torch's ``Unpickler error`` alone, never the advice around it."""
    import re

    if _weights_only_failure(exc):
        for e in _chain(exc):
            found = re.search(r"Unpickler error:\s*(.+)", str(e))
            if found:
                return found.group(1).strip()[:200]
        return "not a weights file torch can read as plain tensors"
    return (str(exc).strip().splitlines() or [""])[0][:200]


def pickle_refused(what: str, exc: BaseException) -> str:
    """One line for a refused pickle: what it tried to load, and a safe way on. Never torch's own
    text, which advises loading it with ``weights_only`` off (running the file's code)."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    names = f" (it asks for {found.group(1)})" if found else ""
    return (f"{what} is a pickle that holds more than tensors{names}; probekit loads weights only as plain "
            "tensors and never runs code from a weights file. Use the model's .safetensors file, or a plain "
            "state dict saved from a copy you trust.")


@contextmanager
def refusing_pickles(what: str) -> Iterator[None]:
    """Around a library loading weights files of ``what`` (e.g. an ``hf:`` folder): a pickle that
    torch refuses is one line (:func:`pickle_refused`), not torch's advice to load it unsafely."""
    try:
        yield
    except ProbekitError:
        raise
    except Exception as exc:
        if refused_pickle(exc):
            raise ConfigError(pickle_refused(what, exc)) from None
        if _weights_only_failure(exc):  # bytes that are no pickle: said without torch's advice
            raise ConfigError(f"{what} holds a weights file torch cannot read ({_torch_reason(exc)}). Give "
                              "the model's .safetensors file, or a plain state dict saved from a copy you "
                              "trust.") from None
        raise
