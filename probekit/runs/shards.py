"""A model's image set in shards: contiguous blocks of images, each sealed as a part of its own as soon
as it is probed, then joined into the model's whole-set part with its rows streamed from the shard
files, so a model's rows never gather in one process.

Both engines shard. The Ray engine always does (:mod:`probekit.runs.engines.ray`: a shard is a block of
chunks gathered from its replicas). The local engine does when the set is larger than one shard
(:func:`probe_shards`, called by :func:`probekit.runs.compare.probe_missing`). A shard's part is keyed
as the model's part for the images ``<fingerprint>#<lo>:<hi>`` (:func:`shard_keys`), so a run stopped
midway recomputes only the shards it had not sealed, on either engine. Beside its rows, a shard
part keeps the state of the metrics whose values need more than its images, as plain JSON: dataset-level
metrics (CKA) and whole-set ones (k-NN, which make no rows per shard). The whole-set part merges
those states (:meth:`~probekit.metric.Metric.merge`) in image order (:func:`whole_part`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from probekit.errors import ConfigError, RunDirError
from probekit.inputs.view import join_arrays, metric_arrays
from probekit.metric.state import state_from_json, state_to_json
from probekit.results import COLUMNS, Results
from probekit.runs.parts import PartStore, model_keys

if TYPE_CHECKING:
    from probekit.metric import Metric
    from probekit.runs.config import CheckedRun, Resources
    from probekit.runs.record import RunRecord

__all__ = ["LOCAL_SHARD", "ShardPlan", "bounds", "cached_shards", "plan_shards", "probe_shards", "read_sealed",
           "seal_whole", "shard_keys", "shard_size", "states_of", "whole_part"]

#: the local engine's images per shard unless ``resources.shard_size`` says otherwise (rounded up to
#: whole batches); a set of at most this many is probed in one call, as it always was
LOCAL_SHARD = 2048

def shard_size(resources: Resources, batch_size: int, default: int) -> int:
    """Images per shard: the run file's ``resources.shard_size`` or ``default``, in whole batches (a
    shard is then the same batches, image for image, as one call over the whole set, and its values
    the same to the last bit)."""
    size = resources.shard_size or default
    return -(-size // batch_size) * batch_size


def bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each shard of ``n`` images.

    >>> bounds(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def shard_keys(run: CheckedRun, i: int, fingerprint: str, shards: list[tuple[int, int]]) -> list[dict[str, str]]:
    """Model ``i``'s part keys per metric label for each shard (the block appended to the fingerprint)."""
    return [model_keys(run, i, f"{fingerprint}#{lo}:{hi}") for lo, hi in shards]


def cached_shards(store: PartStore, keys: list[dict[str, str]], metrics: list[Metric]) -> dict[int, dict[str, Results]]:
    """The shards every metric of ``metrics`` has a sealed part for, with a state that reads (rows left
    in their files); a shard missing one is computed again for all."""
    have: dict[int, dict[str, Results]] = {}
    for s, k in enumerate(keys):
        parts = {m.label: store.read_lazy(k[m.label]) for m in metrics}
        read = {label: p for label, p in parts.items() if p is not None and states_of(p) is not None}
        if len(read) == len(parts):
            have[s] = read
    return have


def states_of(part: Results) -> list[dict] | None:
    """The metric states a shard part stores (a list of state_dicts as plain JSON), or None when
    they are anything else (a planted or older part: the shard is then computed again). Nothing
    read here can run code: see :func:`~probekit.metric.state.state_from_json`."""
    try:
        states = state_from_json(part.meta.get("state", []))
    except ConfigError:
        return None
    ok = isinstance(states, list) and all(isinstance(st, dict) and isinstance(st.get("state"), dict) for st in states)
    return states if ok else None


def keeps_state(m: Metric) -> bool:
    """Whether a shard part of ``m`` must keep its state: its values need more than the shard's images."""
    from probekit.metric import Metric

    return bool(m.whole_set) or type(m).dataset_result is not Metric.dataset_result


# -- the local engine ----------------------------------------------------------------------------------
@dataclass
class ShardPlan:
    """One model's shards on the local engine: their bounds, part keys, and those already sealed."""

    bounds: list[tuple[int, int]]
    keys: list[dict[str, str]]
    have: dict[int, dict[str, Results]] = field(default_factory=dict)

    @property
    def todo(self) -> list[int]:
        return [s for s in range(len(self.bounds)) if s not in self.have]


def plan_shards(run: CheckedRun, i: int, store: PartStore, fingerprint: str, missing: list[Metric]) -> ShardPlan | None:
    """The local engine's shards of model ``i`` for its ``missing`` metrics, or None when the set fits
    in one shard (it is then probed in one call and no shard part is written)."""
    cfg = run.config
    size = shard_size(cfg.resources, cfg.batch_size, LOCAL_SHARD)
    if len(run.images) <= size:
        return None
    b = bounds(len(run.images), size)
    keys = shard_keys(run, i, fingerprint, b)
    return ShardPlan(b, keys, cached_shards(store, keys, missing))


class _Offset:
    """An observer of a shard's forward passes that sees image indices into the whole set."""

    def __init__(self, observer: Any, lo: int):
        self.observer, self.lo = observer, lo

    def start(self, images: Any, pixels: Any, layout: Any) -> None:
        self.observer.start([int(i) + self.lo for i in images], pixels, layout)

    def attention(self, layer: int, attn: Any, layout: Any) -> None:
        self.observer.attention(layer, attn, layout)

    def finish(self) -> None:
        self.observer.finish()


def probe_shards(pm: Any, run: CheckedRun, label: str, missing: list[Metric], plan: ShardPlan, store: PartStore,
                 extra: dict[str, Any], progress: Any = None, observer: Any = None, **options: Any) -> None:
    """Probe the shards of ``plan`` not sealed yet, one call each, and seal each one's parts as soon as
    it is done (its rows leave memory then). ``extra``: metadata kept with every part (what loading
    the model told); ``options``: :func:`~probekit.engine.probe.probe`'s (batch size, dtype, ...)."""
    from probekit.engine.probe import probe

    n = len(run.images)
    base = sum(hi - lo for s, (lo, hi) in enumerate(plan.bounds) if s in plan.have)
    for s in plan.todo:
        lo, hi = plan.bounds[s]
        images = run.images.subset(range(lo, hi))
        mets = [type(m)(**m.options()) for m in missing]
        t0 = time.perf_counter()

        def told(k: int, _total: int, done: int = base) -> None:
            progress(done + k, n)

        res = probe(pm, images, mets, partial=True, label=label, progress=None if progress is None else told,
                    observer=None if observer is None else _Offset(observer, lo), **options)
        here = set(images.names)
        lost = [str(sk[0]) for sk in res.meta["images"]["skipped"] if sk[0] in here]  # (not the set's own skipped)
        gone = set(lost)
        decoded = [name for name in images.names if name not in gone]
        for m in mets:
            part = _local_shard_part(res, m, lo, hi, decoded, lost, time.perf_counter() - t0, extra)
            store.write(plan.keys[s][m.label], part)
        plan.have[s] = {m.label: read_sealed(store, plan.keys[s][m.label]) for m in mets}  # rows back on disk
        base += hi - lo


def read_sealed(store: PartStore, key: str) -> Results:
    """A part just sealed, its rows left in its file."""
    part = store.read_lazy(key)
    if part is None:
        raise RunDirError(f"The part {key} just written in {store.folder} cannot be read back (was it removed?); "
                          "run the same command again to compute it anew.")
    return part


def _local_shard_part(res: Results, m: Metric, lo: int, hi: int, decoded: list[str], lost: list[str],
                      seconds: float, extra: dict[str, Any]) -> Results:
    """One metric's part of a shard the local engine probed: its rows, maps, and state when it keeps one."""
    table = res.table[res.table["metric"].astype(str) == m.label]
    meta = {**res.meta, **extra}
    meta["metrics"] = {m.label: res.meta.get("metrics", {}).get(m.label, {})}
    meta.update(seconds=seconds, shard=[lo, hi], lost=lost,
                state=state_to_json([m.state_dict()] if keeps_state(m) else []))
    if m.whole_set:  # the images its merged state holds, in order: the rows are made from it
        meta["names"] = decoded
    return Results(table.reset_index(drop=True), metric_arrays(res.arrays, m.label), meta)


# -- both engines ------------------------------------------------------------------------------------
def whole_part(run: CheckedRun, label: str, parts: list[Results], m: Any, record: RunRecord, engine: str,
               keys: list[str]) -> Results:
    """A model's whole-set part for metric ``m`` from its shard parts (in image order, under the part
    keys ``keys``), as one call over the whole set makes it. When every shard's rows are still in
    their files, the part has none and lists the shard keys as ``joined_from`` (:func:`seal_whole`
    streams them into it); whole-set metrics make their rows here from the merged state."""
    from probekit.engine.probe import _to_table, build_metrics

    files = [p.source.path for p in parts if p.source is not None and p.source._single]
    joined = len(files) == len(parts)
    table = pd.DataFrame(columns=COLUMNS) if joined else pd.concat([p.table for p in parts], ignore_index=True)
    pieces: dict[str, list[np.ndarray]] = {}
    for p in parts:
        for k, v in p.arrays.items():
            pieces.setdefault(k, []).append(v)
    arrays = {k: join_arrays(k, v) for k, v in pieces.items()}  # input views: the first images only
    merged = build_metrics([(m.name, m.options())])[0]
    for p in parts:
        for st in states_of(p) or []:  # (parts are admitted only when their state reads)
            merged.merge(st)  # the metric state contract: options are checked on merge
    names = record.images.names
    if all("lost" in p.meta for p in parts):  # the local engine's shards say which images failed to decode
        lost = {n for p in parts for n in p.meta["lost"]}
        seen = set(names) - lost
    else:  # (no rows at all, a map metric's: no image is missing)
        seen = (_images_in(files) if joined else set(table["image"].astype(str)) if len(table) else set()) or set(names)
    if merged.whole_set:  # rows that compare images (k-NN): made here, from the state merged in image order
        order = [n for p in parts for n in p.meta.get("names", [])]
        table, made = _to_table(label, order, [merged])
        joined = False
        arrays.update(made)
        if run.images.labels is not None and len(table):
            by_name = dict(zip(run.images.names, run.images.labels, strict=True))
            table["label"] = [by_name[n] for n in table["image"].astype(str)]
        seen = set(order)
    else:
        whole = merged.dataset_result()
        if whole is not None:
            arrays[f"{label}/{m.label}"] = whole
    meta = {k: v for k, v in parts[0].meta.items() if k not in ("state", "shard", "names", "lost")}
    known = {str(s[0]) for s in run.images.skipped}
    skipped = [n for n in names if n not in seen and n not in known]
    meta["images"] = {"count": len(run.images) - len(skipped), "fingerprint": record.images.fingerprint,
                      "skipped": [list(s) for s in run.images.skipped] + [[n, "cannot be decoded"] for n in skipped],
                      "notes": [list(s) for s in run.images.notes]}
    meta["seconds"] = sum(p.meta.get("seconds") or 0.0 for p in parts)
    meta["batch_size"] = run.config.batch_size
    meta["engine"] = engine
    out = Results(table, arrays, meta)
    if joined:  # (read by seal_whole: the shard parts whose rows it copies)
        vars(out)["joined_from"] = list(keys)
    return out


def seal_whole(store: PartStore, key: str, whole: Results) -> None:
    """Write a whole-set part made by :func:`whole_part`: its rows streamed from the shard parts' files
    when it lists them, else from memory."""
    sources = vars(whole).pop("joined_from", None)
    if sources:
        store.write_joined(key, sources, whole)
    else:
        store.write(key, whole)


def _images_in(files: list[Path]) -> set[str]:
    """The image names in part files' rows (one column read per file)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    seen: set[str] = set()
    for f in files:
        col = pq.read_table(f, columns=["image"])["image"]
        seen.update(str(x) for x in pc.unique(col).to_pylist())
    return seen
