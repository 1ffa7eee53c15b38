"""Name -> plugin tables for adapters and metrics, filled from entry points.

Built-in plugins register through the same entry-point groups as anyone's
(``probekit.adapters`` and ``probekit.metrics``), as pytest and flake8 do: finding an
entry point imports nothing, loading happens when a name is first asked for. A broken
plugin raises :class:`~probekit.errors.PluginLoadError` when it is requested (or at once
with ``strict=True``), and never breaks its neighbours. Plugins defined in a session
register with the :func:`register` decorator, which returns its argument.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from probekit.errors import PluginClashError, PluginLoadError, UnknownNameError

__all__ = ["Registry", "PluginRecord", "register", "GROUPS", "adapters", "metrics", "install_command"]

GROUPS = {"adapter": "probekit.adapters", "metric": "probekit.metrics"}


@dataclass
class PluginRecord:
    """One found plugin: where it comes from, and the loaded object once asked for."""

    name: str
    dist: str  # "package version", or "module" for in-session registrations
    entry_point: metadata.EntryPoint | None = None
    obj: Any = None
    error: PluginLoadError | None = None
    clashes: list[str] = field(default_factory=list)  # other distributions claiming the name

    @property
    def display_name(self) -> str:
        return f"{self.name!r} from {self.dist}"


def _natural_key(name: str) -> list:
    """Sort ``patch8`` before ``patch16``, as timm lists models."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _dist_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return f"module {ep.value.split(':')[0]}"
    return f"{dist.metadata['Name']} {dist.version}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def install_command(module: str, *, library: str = "", extra: str = "", dist: str = "probekit") -> str:
    """The ``pip install`` that brings ``module``: the requirement of ``dist`` that provides it
    (through its extra when it has one), else ``library``, else the module's own name."""
    want = _norm(module.split(".")[0])
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        requires = []
    for req in requires:
        name = re.match(r"[A-Za-z0-9._-]+", req)
        if name and _norm(name.group()).startswith(want):
            marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if marker and (not extra or marker.group(1) == extra):
                return f'pip install "{dist}[{marker.group(1)}]"'
            return f"pip install {name.group()}"
    if library and _norm(library).startswith(want):
        return f"pip install {library}"
    return f"pip install {module.split('.')[0].replace('_', '-')}"


class Registry:
    """The plugins of one kind (``"adapter"`` or ``"metric"``).

    >>> from probekit import metrics
    >>> "mad" in metrics.names()
    True
    """

    def __init__(self, kind: str, group: str, validate: Callable[[Any], None] | None = None):
        self.kind, self.group = kind, group
        self._records: dict[str, PluginRecord] = {}  # name -> record
        self._discovered = False
        self._validate = validate

    # -- finding ---------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        found = sorted(metadata.entry_points(group=self.group), key=lambda e: (e.name, e.value))
        seen_values: dict[str, str] = {}
        for ep in found:
            label = _dist_label(ep)
            if seen_values.get(ep.name) == ep.value:
                continue  # the same distribution seen twice on sys.path (editable + site)
            seen_values.setdefault(ep.name, ep.value)
            rec = self._records.get(ep.name)
            if rec is None:
                self._records[ep.name] = PluginRecord(ep.name, label, entry_point=ep)
            elif rec.dist != label:
                rec.clashes.append(label)

    def refresh(self) -> None:
        """Find entry points again (after installing a plugin in a running session)."""
        self._records = {n: r for n, r in self._records.items() if r.entry_point is None}
        self._discovered = False

    # -- listing -----------------------------------------------------------------------------
    def names(self, filter: str | None = None) -> list[str]:
        """Registered names, naturally sorted, optionally filtered by a glob pattern."""
        self._discover()
        names = list(self._records)
        if filter:
            names = [n for n in names if fnmatch.fnmatch(n, filter)]
        return sorted(names, key=_natural_key)

    def records(self) -> list[PluginRecord]:
        self._discover()
        return [self._records[n] for n in self.names()]

    def record(self, name: str) -> PluginRecord | None:
        """Where the plugin ``name`` comes from (its distribution and version), or None."""
        self._discover()
        return self._records.get(name)

    def is_registered(self, name: str) -> bool:
        self._discover()
        return name in self._records

    def __contains__(self, name: str) -> bool:
        return self.is_registered(name)

    def unknown(self, name: str) -> UnknownNameError:
        """The error :meth:`get` raises for a name that is not registered (close names listed), made
        without loading any plugin: for checks that must stay fast (a typo before torch is imported).

        >>> from probekit import metrics
        >>> str(metrics.unknown("madd")).startswith("Unknown metric 'madd'. Did you mean: 'mad'?")
        True
        """
        self._discover()
        return UnknownNameError(self.kind, name, self._records,
                                hint=f"Registered {self.kind}s: {', '.join(self.names())}.")

    def __iter__(self):
        return iter(self.names())

    # -- loading -----------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The plugin registered as ``name``; loads its entry point on first use.

        Raises:
            UnknownNameError: no such name (close names are listed).
            PluginClashError: two distributions claim the name.
            PluginLoadError: the plugin failed to import or is not a valid plugin.
        """
        self._discover()
        rec = self._records.get(name)
        if rec is None:
            raise self.unknown(name)
        if rec.clashes:
            raise PluginClashError(
                f"The {self.kind} name {name!r} is claimed by more than one distribution: "
                f"{', '.join([rec.dist, *rec.clashes])}. Uninstall one of them."
            )
        return self._load(rec)

    def _load(self, rec: PluginRecord) -> Any:
        if rec.obj is not None:
            return rec.obj
        if rec.error is not None:
            raise rec.error
        assert rec.entry_point is not None  # a record without its object was found by its entry point
        try:
            obj = rec.entry_point.load()
            self._check(obj, rec.name)
        except Exception as exc:  # any failure of third-party code becomes one error type
            missing = None
            if isinstance(exc, ModuleNotFoundError) and exc.name:
                dist = getattr(rec.entry_point, "dist", None)
                missing = install_command(exc.name, dist=dist.metadata["Name"] if dist is not None else "probekit")
            rec.error = PluginLoadError(rec.display_name, exc, kind=self.kind, install=missing)
            rec.error.__cause__ = exc
            raise rec.error from exc
        rec.obj = obj
        return obj

    def load_all(self, strict: bool = False) -> list[PluginLoadError | PluginClashError]:
        """Load every plugin; return the failures, or raise the first with ``strict=True``."""
        errors: list[PluginLoadError | PluginClashError] = []
        for rec in self.records():
            try:
                self.get(rec.name)
            except (PluginLoadError, PluginClashError) as exc:
                if strict:
                    raise
                errors.append(exc)
        return errors

    # -- in-session registration ---------------------------------------------------------
    def register(self, obj: Any = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: its ``name`` attribute); usable as a decorator.

        A name already taken warns, naming both modules, and the new object wins.
        """

        def _do(o):
            key = name or getattr(o, "name", None) or o.__name__
            label = f"module {getattr(o, '__module__', '?')}"
            try:
                self._check(o, key)
            except (TypeError, ValueError) as exc:
                raise PluginLoadError(f"{key!r} from {label}", exc) from exc
            self._discover()
            old = self._records.get(key)
            if old is not None and old.obj is not o:
                warnings.warn(
                    f"{self.kind} {key!r} from {label} replaces the one from {old.dist}.", stacklevel=3
                )
            self._records[key] = PluginRecord(key, label, obj=o)
            return o

        return _do if obj is None else _do(obj)

    def _check(self, obj: Any, name: str) -> None:
        """A valid plugin of this kind whose ``name`` is the name it is registered under.

        One name: rows, labels and cache keys carry the class's ``name``, so an entry point
        ``gini`` whose class says ``attn_gini`` would silently label rows with another name.
        """
        if self._validate is not None:
            self._validate(obj)
        own = getattr(obj, "name", None)
        if isinstance(obj, type) and own != name:
            raise ValueError(
                f"it is registered as {name!r} but its class {obj.__module__}.{obj.__qualname__} says "
                f"name = {own!r}; a {self.kind} has one name: make the entry point name and the "
                "class's name the same"
            )

    def unregister(self, name: str) -> None:
        self._records.pop(name, None)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _validate_adapter(obj: Any) -> None:
    from probekit.adapter import Adapter

    if not (isinstance(obj, type) and issubclass(obj, Adapter)):
        raise TypeError(f"expected a subclass of probekit.Adapter, got {obj!r}")


def _validate_metric(obj: Any) -> None:
    from probekit.metric import Metric

    if not (isinstance(obj, type) and issubclass(obj, Metric)):
        raise TypeError(f"expected a subclass of probekit.Metric, got {obj!r}")


adapters = Registry("adapter", GROUPS["adapter"], _validate_adapter)
metrics = Registry("metric", GROUPS["metric"], _validate_metric)
_BY_KIND = {"adapter": adapters, "metric": metrics}


def register(kind: str, name: str | None = None):
    """Decorator: ``@register("metric")`` puts a class in the registry of that kind."""
    if kind not in _BY_KIND:
        raise UnknownNameError("plugin kind", kind, _BY_KIND)
    return _BY_KIND[kind].register(name=name)
