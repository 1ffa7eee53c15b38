"""Cached parts: one finished (model, image set, metric) result, kept under a key of its inputs.

A part is reused only if every input that made it is the same (DESIGN.md, "Contracts"): the
model spec and options, the content of every local file the adapter reads (checkpoints, ONNX
graphs, a Hugging Face directory or cache snapshot), the image set's content, the metric and
its options, the run settings the metric declares it depends on (``Metric.depends_on``: the
batch size of minibatch CKA), the dtype, the seed of a random init, and the versions of
probekit, the model libraries and both plugins (the adapter's and the metric's distribution,
and the content of all its files, :mod:`probekit.runs.plugin_files`: an editable plugin fixed in
place, or reinstalled with the same version, changes no version).

A part is ``<key>.parquet`` (plus ``<key>.npz`` for map arrays) and ``<key>.seal.json``,
written last, with the SHA-256 of each file. A part whose seal is missing or does not match
(a flipped byte, a truncated copy) is recomputed, never served.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekit._io.atomic import atomic_path, write_text_atomic
from probekit._io.fileid import file_digest, files_identity
from probekit.errors import ConfigError, ProbekitError
from probekit.inputs.view import metric_arrays
from probekit.results import Results
from probekit.results.table import _META_KEY
from probekit.runs.plugin_files import files_digest, plugin_files

if TYPE_CHECKING:
    from probekit.adapter import Adapter
    from probekit.runs.config import CheckedRun

__all__ = ["part_key", "model_keys", "PartStore", "weight_files", "plugin_identity", "relabel", "only_metric"]

_PART_FORMAT = 2  # bump when the layout of a part file changes: old parts are then ignored


def plugin_identity(kind: str, name: str, cls: type | None = None) -> dict[str, Any]:
    """Where a plugin comes from: its distribution and version, and the content of all its files
    (:mod:`probekit.runs.plugin_files`: every file of the distribution, or of its package tree)."""
    from probekit.registry import adapters, metrics

    rec = (adapters if kind == "adapter" else metrics).record(name)
    if cls is None and rec is not None:
        cls = rec.obj
    # registered in-session (pk.register): no distribution, and the module's import name is an accident
    ep = rec.entry_point if rec is not None else None
    dist = None if rec is None or ep is None else rec.dist
    files = None if cls is None else files_digest(plugin_files(cls, getattr(ep, "dist", None)))
    return {"dist": dist, "files": files}


def _probekit_files() -> str | None:
    """probekit's own files (its engine), as a plugin's are keyed (:mod:`probekit.runs.plugin_files`)."""
    from importlib import metadata

    from probekit.metric import Metric

    try:
        dist = metadata.distribution("probekit")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        dist = None
    return files_digest(plugin_files(Metric, dist))


def _settings(metric: Any, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run settings ``metric`` declares it depends on (``Metric.depends_on``), with their values."""
    wanted = tuple(getattr(metric, "depends_on", ()))
    given = settings or {}
    missing = [s for s in wanted if s not in given]
    if missing:
        raise ConfigError(f"Metric {metric.name!r} depends on the run setting(s) {', '.join(missing)}, which "
                          "the part key was not given; pass settings={...} to part_key.")
    return {s: given[s] for s in wanted}


def _adapter_class(spec: str) -> type[Adapter] | None:
    from probekit.registry import adapters

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


def part_key(spec: str, options: dict, fingerprint: str, metric: Any, dtype: str, seed: int | None = None,
             settings: Mapping[str, Any] | None = None) -> str:
    """The cache key of one finished part (see the module docstring for what it covers).

    ``settings``: the run's settings (``{"batch_size": 16, ...}``); the key takes those the
    metric declares in ``depends_on``. The model's label is not part of the key (renaming a
    model reuses its parts).

    Raises:
        ConfigError: the metric depends on a setting that ``settings`` lacks.
    """
    from probekit._installed import library_versions

    versions = library_versions()

    prefix = spec.partition(":")[0]
    ident = {
        "format": _PART_FORMAT,
        # a new release may compute differently: never reuse across versions
        "probekit": versions.get("probekit", "0+unknown"),
        "probekit_files": _probekit_files(),  # nor a checkout or reinstall that changed its engine
        "libraries": versions,  # nor across torch/timm/transformers/... upgrades (defaults, kernels)
        "adapter": plugin_identity("adapter", prefix, _adapter_class(spec)),
        "metric_plugin": plugin_identity("metric", metric.name, type(metric)),
        "spec": spec,
        "options": options,
        "files": files_identity(weight_files(spec, options)),
        "images": fingerprint,
        "metric": metric.name,
        "metric_options": metric.options(),
        "dtype": str(dtype),
        "settings": _settings(metric, settings),
    }
    if seed is not None:
        ident["seed"] = int(seed)
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# what a part's metadata holds, by type: anything else is a planted or damaged part (recomputed)
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str, "spec": str, "adapter": str, "model_meta": dict, "layout": (dict, type(None)),
    "geometry": (dict, list, type(None)), "metrics": dict, "images": dict, "device": (str, type(None)),
    "dtype": (str, type(None)), "seconds": (int, float, type(None)), "versions": (dict, type(None)),
    "batch_size": (int, type(None))}


def _plausible_meta(meta: Any) -> bool:
    """Whether a part's metadata has the types a run reads from it (JSON of odd types is refused)."""
    if not isinstance(meta.get("model"), str) or not all(isinstance(meta[k], t) for k, t in _META_TYPES.items()
                                                         if k in meta):
        return False
    skipped = (meta.get("images") or {}).get("skipped") or []
    return isinstance(skipped, list) and all(isinstance(s, list) and all(isinstance(x, str) for x in s)
                                             for s in skipped)


def model_keys(run: CheckedRun, i: int, images: str) -> dict[str, str]:
    """Part keys of model ``i`` per metric label, for the images named by ``images`` (a
    fingerprint; an engine that shards appends the block it covers)."""
    from probekit.engine.probe import resolve_dtype
    from probekit.metric import RUN_SETTINGS

    cfg = run.config
    spec, opts, _ = run.specs[i]
    seed = cfg.seed if opts.get("pretrained", True) is False else None  # it draws random-init weights
    dtype = str(resolve_dtype(cfg.dtype))  # bf16 and bfloat16 are one part
    settings = {s: getattr(cfg, s) for s in RUN_SETTINGS}  # each metric's key takes those it depends on
    return {m.label: part_key(spec, opts, images, m, dtype, seed, settings) for m in run.metrics}


class PartStore:
    """The ``parts/`` folder of a run directory."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _files(self, key: str) -> tuple[Path, Path, Path]:
        f = self.folder
        return f / f"{key}.parquet", f / f"{key}.npz", f / f"{key}.seal.json"

    def read(self, key: str, rows: bool = True) -> Results | None:
        """The part under ``key``, or None if it is absent or fails its seal (then it is recomputed).

        ``rows=False``: its rows stay in the file (read when the table is used, or copied into a
        run's results folder batch by batch, :meth:`probekit.runs.rundir.RunDir.keep_rows`)."""
        pq, npz, seal = self._files(key)
        try:
            sums = json.loads(seal.read_text())["files"]
            for path in (pq, npz):
                if sums.get(path.name) != (file_digest(path) if path.exists() else None):
                    return None
            res = Results.read_parquet(pq) if rows else _lazy_part(pq)
            if not _plausible_meta(res.meta):
                return None
            if npz.exists():
                res.arrays = Results.read_arrays(npz, models=[res.meta["model"], *res.models])  # a str: plausible
        except Exception:  # absent, damaged or unreadable: recompute, never trust
            return None
        return res

    def read_lazy(self, key: str) -> Results | None:
        """:meth:`read` with the rows left in the part's file (a store that reads parts its own way,
        overriding :meth:`read`, gives them with their rows)."""
        if type(self).read is not PartStore.read:
            return self.read(key)
        return self.read(key, rows=False)

    def write(self, key: str, res: Results) -> None:
        """Write a part: its files first, the seal with their checksums last (the seal marks it done)."""
        self._sealed(key, res, res.to_parquet)

    def _sealed(self, key: str, res: Results, write_rows: Callable[[Path], Any]) -> None:
        """A part's files written, seal first removed and written last: ``res``'s arrays, then its rows
        by ``write_rows(path)`` (the part's Parquet file), then the seal with both files' checksums."""
        pq, npz, seal = self._files(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        seal.unlink(missing_ok=True)
        sums = {}
        if res.arrays:
            res.save_arrays(npz)
            sums[npz.name] = file_digest(npz)
        else:
            npz.unlink(missing_ok=True)
        write_rows(pq)
        sums[pq.name] = file_digest(pq)
        write_text_atomic(seal, json.dumps({"format": _PART_FORMAT, "files": sums}))

    def write_joined(self, key: str, sources: list[str], res: Results) -> None:
        """Write a part whose rows are those of the parts under the keys ``sources``, in order (streamed,
        never all in memory), and whose arrays and metadata are ``res``'s; sealed as :meth:`write` seals."""
        self.write_files(key, [self._files(k)[0] for k in sources], res)

    def write_files(self, key: str, paths: list[Path], res: Results) -> None:
        """Write a part whose rows are those of the parquet files ``paths`` (non-empty), in order (streamed,
        never all in memory), and whose arrays and metadata are ``res``'s; sealed as :meth:`write` seals."""
        import pyarrow as pa
        import pyarrow.parquet as pq_

        files = [pq_.ParquetFile(p) for p in paths]
        full = [f for f in files if f.metadata.num_rows] or files[:1]  # (a shard of unreadable images has none)
        first = full[0].schema_arrow
        schema = first.with_metadata({**(first.metadata or {}), _META_KEY: json.dumps(res.meta, default=str).encode()})

        def rows(pq: Path) -> None:
            with atomic_path(pq) as tmp, pq_.ParquetWriter(tmp, schema) as out:
                for f in full:
                    for b in f.iter_batches(batch_size=1 << 16):
                        out.write_table(pa.Table.from_batches([b]).cast(schema))

        self._sealed(key, res, rows)

    def discard(self, key: str) -> None:
        """Remove a part (seal first, so a half-removed part is never served)."""
        pq, npz, seal = self._files(key)
        for path in (seal, pq, npz):
            path.unlink(missing_ok=True)


def _lazy_part(path: Path) -> Results:
    """A part file's metadata, its rows left in the file (:meth:`Results.scan` of it)."""
    scan = Results.scan(path)
    return Results._lazy(scan, meta=scan.meta)


def relabel(res: Results, label: str) -> Results:
    """A cached part under the model name this run uses."""
    old = res.meta.get("model")
    if old == label:
        return res
    if res.source is not None:  # rows still in the part's file: renamed as they are read
        arrays = {f"{label}/{k.rsplit('/', 1)[1]}": v for k, v in res.arrays.items()}
        return Results._lazy(res.source.relabelled(label), arrays, {**res.meta, "model": label})
    table = res.table.astype({"model": str})
    table["model"] = label
    arrays = {f"{label}/{k.rsplit('/', 1)[1]}": v for k, v in res.arrays.items()}
    return Results(table, arrays, {**res.meta, "model": label})


def only_metric(res: Results, metric_label: str) -> Results:
    """The rows, arrays and metadata of one metric: the part it is cached as."""
    table = res.table[res.table["metric"].astype(str) == metric_label]
    arrays = metric_arrays(res.arrays, metric_label)  # with the model's input views: drawn from the part alone
    meta = dict(res.meta)
    meta["metrics"] = {metric_label: res.meta.get("metrics", {}).get(metric_label, {})}
    return Results(table, arrays, meta)
