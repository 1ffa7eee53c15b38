"""Cached parts: one finished (model, image set, metric) result, kept under a key of its inputs.

A part is reused only if every input that made it is the same (DESIGN.md, "Contracts"): the
model spec and options, the content of every local file the adapter reads (checkpoints, ONNX
graphs, a Hugging Face directory or cache snapshot), the image set's content, the metric and
its options, the dtype, the seed of a random init, and the versions of probekit, the model
libraries and both plugins (the adapter's and the metric's distribution, and the content of
the module that defines each: an editable plugin fixed in place changes no version).

A part is ``<key>.parquet`` (plus ``<key>.npz`` for map arrays) and ``<key>.seal.json``,
written last, with the SHA-256 of each file. A part whose seal is missing or does not match
(a flipped byte, a truncated copy) is recomputed, never served.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import ProbekitError
from .fileid import file_digest, files_identity
from .results import Results

__all__ = ["part_key", "PartStore", "weight_files", "plugin_identity", "relabel", "only_metric"]

_PART_FORMAT = 2  # bump when the layout of a part file changes: old parts are then ignored


def _module_digest(cls: type) -> str | None:
    """The content of the file that defines ``cls`` (None for a class typed into a session)."""
    try:
        src = inspect.getsourcefile(cls)
    except TypeError:  # its module is not in sys.modules (loaded from a path): ask its functions
        codes = [f.__code__ for f in vars(cls).values() if hasattr(f, "__code__")]
        src = codes[0].co_filename if codes else None
    return file_digest(src) if src and Path(src).is_file() else None


def plugin_identity(kind: str, name: str, cls: type | None = None) -> dict[str, Any]:
    """Where a plugin comes from: its distribution and version, and its module's content."""
    from .registry import adapters, metrics

    rec = (adapters if kind == "adapter" else metrics).record(name)
    if cls is None and rec is not None:
        cls = rec.obj
    # registered in-session (pk.register): no distribution, and the module's import name is an accident
    dist = rec.dist if rec is not None and rec.entry_point is not None else None
    return {"dist": dist, "source": None if cls is None else _module_digest(cls)}


def _adapter_class(spec: str) -> type | None:
    from .registry import adapters

    try:
        return adapters.get(spec.partition(":")[0])
    except ProbekitError:  # a broken plugin: the load fails and is recorded; the key need not be exact
        return None


def weight_files(spec: str, options: dict) -> list[Path]:
    """The local files a model is built from, as its adapter declares them (see Adapter.weight_files)."""
    cls = _adapter_class(spec)
    if cls is None:
        return []
    try:
        return [Path(p) for p in cls.weight_files(spec.partition(":")[2], **options)]
    except ProbekitError:  # e.g. an onnx:pkg: package that is gone: the load will say so
        return []


def part_key(spec: str, options: dict, fingerprint: str, metric: Any, dtype: str, seed: int | None = None) -> str:
    """The cache key of one finished part (see the module docstring for what it covers).

    The model's label is not part of the key (renaming a model reuses its parts).
    """
    from . import __version__
    from .probe import _versions

    prefix = spec.partition(":")[0]
    ident = {
        "format": _PART_FORMAT,
        "probekit": __version__,  # a new release may compute differently: never reuse across versions
        "libraries": _versions(),  # nor across torch/timm/transformers/... upgrades (defaults, kernels)
        "adapter": plugin_identity("adapter", prefix, _adapter_class(spec)),
        "metric_plugin": plugin_identity("metric", metric.name, type(metric)),
        "spec": spec,
        "options": options,
        "files": files_identity(weight_files(spec, options)),
        "images": fingerprint,
        "metric": metric.name,
        "metric_options": metric.options(),
        "dtype": str(dtype),
    }
    if seed is not None:
        ident["seed"] = int(seed)
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class PartStore:
    """The ``parts/`` folder of a run directory."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _files(self, key: str) -> tuple[Path, Path, Path]:
        f = self.folder
        return f / f"{key}.parquet", f / f"{key}.npz", f / f"{key}.seal.json"

    def read(self, key: str) -> Results | None:
        """The part under ``key``, or None if it is absent or fails its seal (then it is recomputed)."""
        pq, npz, seal = self._files(key)
        try:
            sums = json.loads(seal.read_text())["files"]
            for path in (pq, npz):
                if sums.get(path.name) != (file_digest(path) if path.exists() else None):
                    return None
            res = Results.read_parquet(pq)
            if npz.exists():
                res.arrays = Results.read_arrays(npz, models=[res.meta.get("model"), *res.models])
        except Exception:  # absent, damaged or unreadable: recompute, never trust
            return None
        return res

    def write(self, key: str, res: Results) -> None:
        """Write a part: its files first, the seal with their checksums last (the seal marks it done)."""
        pq, npz, seal = self._files(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        seal.unlink(missing_ok=True)
        sums = {}
        if res.arrays:
            res.save_arrays(npz)
            sums[npz.name] = file_digest(npz)
        else:
            npz.unlink(missing_ok=True)
        res.to_parquet(pq)
        sums[pq.name] = file_digest(pq)
        write_text_atomic(seal, json.dumps({"format": _PART_FORMAT, "files": sums}))

    def discard(self, key: str) -> None:
        """Remove a part (seal first, so a half-removed part is never served)."""
        pq, npz, seal = self._files(key)
        for path in (seal, pq, npz):
            path.unlink(missing_ok=True)


def relabel(res: Results, label: str) -> Results:
    """A cached part under the model name this run uses."""
    old = res.meta.get("model")
    if old == label:
        return res
    table = res.table.astype({"model": str})
    table["model"] = label
    arrays = {f"{label}/{k.rsplit('/', 1)[1]}": v for k, v in res.arrays.items()}
    return Results(table, arrays, {**res.meta, "model": label})


def only_metric(res: Results, metric_label: str) -> Results:
    """The rows, arrays and metadata of one metric: the part it is cached as."""
    table = res.table[res.table["metric"].astype(str) == metric_label]
    arrays = {k: v for k, v in res.arrays.items() if k.rsplit("/", 1)[1] == metric_label}
    meta = dict(res.meta)
    meta["metrics"] = {metric_label: res.meta.get("metrics", {}).get(metric_label, {})}
    return Results(table, arrays, meta)
