"""Model aliases (``dino-s16`` -> a spec with training kind and family), built-in and from plugins.

Aliases are data: probekit's own live in ``configs/models.yaml``; a plugin ships its own through
the ``probekit.aliases`` entry-point group, so its models carry a training kind and family in
tables and figure titles like built-in ones. An entry point names either a YAML resource inside
a package or a dict::

    [project.entry-points."probekit.aliases"]
    mine = "my_plugin:aliases.yaml"        # the file aliases.yaml inside package my_plugin
    other = "my_plugin.models:ALIASES"     # a dict {alias: {spec, family, training, ...}}

Each alias maps to ``{spec, family, training, patch_size, weights, options, install}`` (only
``spec`` is required). The reserved key ``backends`` maps a backend (spec prefix) to one line
saying what it loads, shown by ``probekit models``. Nothing here imports torch or a model library,
so listings stay fast. A built-in alias is never replaced by a plugin's; a clash is reported as a
warning. An alias given twice in one file is an error that names both lines (a plugin's file is
then skipped with a warning), never a silent last-wins.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from importlib import metadata, resources
from typing import Any

__all__ = ["aliases", "backend_descriptions", "GROUP", "BUILTIN", "RESERVED"]

GROUP = "probekit.aliases"
BUILTIN = "probekit"  # the distribution of configs/models.yaml
RESERVED = "backends"  # the key of an alias file that describes backends, not an alias


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    from probekit._io.safe_yaml import load_yaml

    table = load_yaml(text, where) or {}  # an alias defined twice is refused, not silently replaced
    if not isinstance(table, dict):
        raise ValueError(f"{where} must map alias names to {{spec: ..., family: ..., training: ...}}")
    return table


def _from_entry_point(ep: metadata.EntryPoint) -> dict[str, Any]:
    module, _, attr = ep.value.partition(":")
    if attr.endswith((".yaml", ".yml")):
        return _read_yaml(resources.files(module.strip()).joinpath(attr.strip()).read_text(), ep.value)
    table = ep.load()
    if not isinstance(table, dict):
        raise ValueError(f"{ep.value} is a {type(table).__name__}, not a dict of aliases")
    return table


def _source(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else ep.value.split(":")[0]


def _tables() -> list[tuple[str, dict[str, Any]]]:
    """``(source, table)`` for models.yaml, then each plugin's alias file (unreadable ones warned)."""
    text = resources.files("probekit.configs").joinpath("models.yaml").read_text()
    try:
        source = f"{BUILTIN} {metadata.version(BUILTIN)}"  # as the registry names a distribution
    except metadata.PackageNotFoundError:
        source = BUILTIN
    out = [(source, _read_yaml(text, "models.yaml"))]
    seen = set()
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        if ep.value in seen:  # the same distribution twice on sys.path
            continue
        seen.add(ep.value)
        try:
            out.append((_source(ep), _from_entry_point(ep)))
        except Exception as exc:  # third-party data: one warning, never a crash
            warnings.warn(f"Skipped the aliases of {_source(ep)} ({ep.value}): {exc}", stacklevel=3)
    return out


@lru_cache(maxsize=1)
def aliases() -> dict[str, dict[str, Any]]:
    """Every alias: ``{alias: {spec, family, training, ..., alias, source}}``, built-in first.

    A plugin's alias file that cannot be read is skipped with a warning naming it (the
    other aliases stay usable), as a broken plugin never breaks its neighbours.
    """
    out: dict[str, dict[str, Any]] = {}
    for source, table in _tables():
        for name, entry in table.items():
            if name == RESERVED:
                continue
            if not isinstance(entry, dict) or "spec" not in entry:
                warnings.warn(f"Alias {name!r} from {source} has no spec; skipped.", stacklevel=2)
            elif name in out:
                warnings.warn(f"Alias {name!r} from {source} is already defined by {out[name]['source']}; "
                              "the first one is kept.", stacklevel=2)
            else:
                out[name] = dict(entry, alias=name, source=source)
    return out


@lru_cache(maxsize=1)
def backend_descriptions() -> dict[str, str]:
    """``{backend: what it loads}`` from the ``backends`` sections of the alias files."""
    out: dict[str, str] = {}
    for _, table in _tables():
        section = table.get(RESERVED)
        if isinstance(section, dict):
            for name, text in section.items():
                out.setdefault(str(name), str(text))
    return out
