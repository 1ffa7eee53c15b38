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

import importlib.util
import os
import re
import warnings
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from probekit.errors import UnknownNameError

__all__ = ["aliases", "backend_descriptions", "resolve", "backend_problem", "weights_status", "WEIGHTS_STATES",
           "OFFLINE_STATES",
           "GROUP", "BUILTIN", "RESERVED", "SPEC_HELP"]

GROUP = "probekit.aliases"
BUILTIN = "probekit"  # the distribution of configs/models.yaml
RESERVED = "backends"  # the key of an alias file that describes backends, not an alias
SPEC_HELP = (
    "A model is an alias from `probekit models` or a spec: hf:<repo id>, timm:<model name>, "
    "open_clip:<arch>/<pretrained tag>, onnx:<path>."
)


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


# -- names, checked without loading a plugin ----------------------------------------------------------
def resolve(name: str, **options: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(spec, options, metadata)`` for an alias or a spec; explicit options win.

    Raises:
        UnknownNameError: ``name`` is neither an alias nor a ``backend:name`` spec (close aliases listed).
    """
    table = aliases()
    if name in table:
        entry = dict(table[name])
        spec = entry.pop("spec")
        opts = {**entry.pop("options", {}), **options}
        return spec, opts, entry
    if ":" not in name:
        raise UnknownNameError("model", name, table, hint=SPEC_HELP)
    return name, dict(options), {}


def backend_problem(prefix: str) -> UnknownNameError | None:
    """The error for a spec prefix that names no installed backend (close names listed), or None.

    Reads the entry points only: the backend's plugin is not imported (a typo fails before torch loads).
    """
    from probekit.registry import adapters

    if prefix in adapters:
        return None
    return UnknownNameError("backend", prefix, adapters.names(), hint=SPEC_HELP)


# -- whose weights are on this machine (read from the caches' folders: nothing downloaded or imported)
#: what :func:`weights_status` answers, and what each answer means
WEIGHTS_STATES = {
    "cached": "in the Hugging Face cache (or torch hub's): loads offline",
    "bundled": "inside an installed Python package: loads offline",
    "local": "a local file or folder the spec or its checkpoint names: loads offline",
    "random init": "the alias builds the architecture at random init: no weights needed",
    "download": "not on this machine: the first load downloads it (needs a network)",
    "not installed": "inside a Python package that is not installed (see the alias's install line)",
    "missing": "a local file or folder the spec names is not there",
    "unknown": "a plugin's backend whose weights probekit cannot locate",
}
#: the answers under which an alias loads with no network
OFFLINE_STATES = ("cached", "bundled", "local", "random init")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz", ".onnx", ".h5", ".msgpack")
_REPO = re.compile(r"[\w.-]+/[\w.-]+")


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(path)))


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it (``HF_HUB_CACHE``, else ``HF_HOME``/hub,
    else ``$XDG_CACHE_HOME``/huggingface/hub, else ~/.cache/huggingface/hub), read from the
    environment now."""
    found = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if found:
        return _expand(found)
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return _expand(home) / "hub"


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoint folder (``TORCH_HOME``/hub/checkpoints, else ``$XDG_CACHE_HOME``/torch/...)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return _expand(home) / "hub" / "checkpoints"


def _hf_cached(repo: str) -> bool:
    """Whether a snapshot of model repo ``repo`` in the hub cache holds a weights file (links followed:
    a download cut short leaves none)."""
    snapshots = hf_hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    try:
        return any(f.suffix in _WEIGHT_SUFFIXES and f.is_file() for snap in snapshots.iterdir() for f in snap.iterdir())
    except OSError:
        return False


def _package_file(spec: str) -> Path | None:
    """The file ``pkg:<package>/<path>`` names inside an installed package (found, not imported), or None."""
    pkg, _, rel = spec.partition("/")
    found = importlib.util.find_spec(pkg) if pkg and "." not in pkg else None
    if found is None:
        return None
    roots = list(found.submodule_search_locations or []) or (
        [str(Path(found.origin).parent)] if found.origin else [])
    return Path(roots[0]) / rel if roots else None


def _hub_repo(backend: str, name: str, weights: Any) -> str | None:
    """The Hugging Face repo that holds an alias's weights: its ``weights`` when that is a repo id
    (alone or in parentheses, as in ``open_clip ViT-B-16/openai (timm/vit_base_patch16_clip_224.openai)``),
    else what the spec implies (``hf:<repo>``; ``timm:<arch>.<tag>`` is ``timm/<arch>.<tag>``)."""
    if isinstance(weights, str):
        text = weights.strip()
        if _REPO.fullmatch(text):
            return text
        inner = re.search(r"\((" + _REPO.pattern + r")\)", text)
        if inner:
            return inner.group(1)
    if backend == "hf" and _REPO.fullmatch(name):
        return name
    if backend == "timm" and "." in name:
        return f"timm/{name}"
    return None


def weights_status(entry: dict[str, Any]) -> str:
    """Whether an alias's weights are on this machine: one key of :data:`WEIGHTS_STATES`.

    Looks only at folders (the Hugging Face hub cache, torch hub's checkpoints, installed packages,
    local paths); nothing is downloaded and no model library is imported. ``entry`` is an alias's
    entry (``spec``, ``weights``, ``options``).
    """
    backend, _, name = str(entry.get("spec", "")).partition(":")
    opts = entry.get("options") or {}
    if opts.get("pretrained") is False:
        return "random init"
    if opts.get("checkpoint"):
        return "local" if _expand(str(opts["checkpoint"])).is_file() else "missing"
    if backend == "onnx":
        if name.startswith("pkg:"):
            path = _package_file(name[4:])
            return "not installed" if path is None else "bundled" if path.is_file() else "missing"
        return "local" if _expand(name).is_file() else "missing"
    if backend == "hf" and (name.startswith((".", "/", "~")) or _expand(name).is_dir()):
        return "local" if _expand(name).is_dir() else "missing"
    weights = entry.get("weights")
    if isinstance(weights, str) and weights.startswith(("http://", "https://")):  # a torch hub download
        return "cached" if (torch_hub_checkpoints() / weights.rsplit("/", 1)[-1]).is_file() else "download"
    repo = _hub_repo(backend, name, weights)
    if repo is None:
        return "unknown"
    return "cached" if _hf_cached(repo) else "download"
