"""The Ray engine's stages, run in Ray worker processes (no Ray import here).

- :func:`decode_chunk`: a CPU stage; one chunk (one batch of a shard) decoded and put through
  the model's own preprocessing, exactly as the local engine's DataLoader does (the same
  :class:`~probekit.inputs.images.ImageSet` dataset and collate, so unreadable images are skipped
  or stop the run the same way).
- :class:`ProbeReplica`: the callable class of a model's actor pool; it loads the model once
  (seeded as the local engine seeds it) and probes one chunk per call with the local engine
  itself. With a run directory on a folder (local or shared by the nodes), the replica writes the
  chunk's per-image rows itself, one parquet file per metric in ``parts/`` (:func:`chunk_file`), and
  returns only their names, row counts and SHA-256, with the state of dataset-level metrics (and of
  metrics whose rows need the whole set, e.g. k-NN: the driver makes their rows from the merged
  state); the driver checks the digests and seals the shard from those files, streamed. Without
  such a folder (an ``s3://`` run directory) the rows are returned to the driver, which writes them.

A chunk is exactly one of the local engine's batches (same images, same order), so both
engines run the same arithmetic and their values agree to the last bit on one machine.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from typing import Any

import numpy as np

__all__ = ["decode_chunk", "ProbeReplica", "chunk_file"]


def chunk_file(folder: str | os.PathLike, shard_key: str, chunk: int) -> str:
    """Where a replica writes one chunk's rows of the shard part ``shard_key`` (until the shard is sealed)."""
    return os.path.join(os.fspath(folder), f"{shard_key}.chunk{int(chunk):07d}.rows.parquet")


def decode_chunk(row: dict[str, Any], transform: Any) -> dict[str, Any]:
    """``{chunk, images (a pickled ImageSet)}`` -> ``{chunk, pixels [b, C, H, W], kept, names, labels, decode_s}``
    (``names``: the kept images' names as a JSON list; ``labels``: their labels as a JSON list, ``null`` for an
    unlabelled set: plain string columns, whatever Arrow makes of lists of strings, and never a column of
    nulls, which a batch beside another string column may hand over as NaN)."""
    from probekit.inputs.images import collate

    t0 = time.perf_counter()
    images = pickle.loads(row["images"])
    ds = images.dataset(transform)
    kept, x = collate([ds[j] for j in range(len(images))])
    pixels = np.zeros((0,), np.float32) if x is None else x.numpy()
    labels = json.dumps(None if images.labels is None else [str(images.labels[int(i)]) for i in kept])
    names = json.dumps([str(images.names[int(i)]) for i in kept])
    return {"chunk": row["chunk"], "pixels": pixels, "kept": kept.numpy().astype(np.int64), "names": names,
            "labels": labels, "decode_s": time.perf_counter() - t0}


def _labels(col: Any) -> list[str] | None:
    """A chunk's labels from :func:`decode_chunk`'s JSON (None for an unlabelled set)."""
    got = json.loads(col) if isinstance(col, str) else None
    return None if got is None else [str(v) for v in got]


class ProbeReplica:
    """One replica of one model: loads it once, probes a chunk per call."""

    def __init__(self, model: str, label: str, options: dict, seed: int, device: str | None,
                 metrics: list[tuple[str, dict]], dtype: str, batch_size: int, rows_dir: str | None = None,
                 shard_keys: list[dict[str, str]] | None = None, shard_size: int = 0):
        import torch

        from probekit.inputs.memory import tame
        from probekit.models import load

        tame()
        with torch.random.fork_rng(devices=[]):  # the local engine's seeding: the same random-init weights
            torch.manual_seed(seed)
            self.pm = load(model, label=label, device=device, **options)
        self.label, self.metrics, self.dtype, self.batch_size = label, metrics, dtype, batch_size
        self.rows_dir, self.shard_keys, self.shard_size = rows_dir, shard_keys, shard_size

    def _write_rows(self, chunk: int, table: Any, names: list[str], labels: list[str] | None,
                    mets: list) -> dict[str, dict[str, Any]]:
        """The chunk's rows under their images' names, one file per metric with rows (as the driver would
        write them); ``{metric label: {file, rows, sha256}}``."""
        from probekit._io.fileid import file_digest
        from probekit.results import Results

        assert self.rows_dir is not None and self.shard_keys is not None  # noqa: S101  (set together by the driver)
        keys = self.shard_keys[chunk * self.batch_size // self.shard_size]
        idx = [int(i) for i in table["image"].astype(str)]  # rows name images by their place in the chunk
        table["image"] = [names[i] for i in idx]
        if labels is not None:
            table["label"] = [labels[i] for i in idx]
        out = {}
        for m in mets:
            t = table[table["metric"].astype(str) == m.label]
            if not len(t):
                continue
            path = chunk_file(self.rows_dir, keys[m.label], chunk)
            Results(t.reset_index(drop=True), {}, {"model": self.label}).to_parquet(path)  # atomic: whole or absent
            out[m.label] = {"file": os.path.basename(path), "rows": len(t), "sha256": file_digest(path)}
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from probekit.engine.probe import build_metrics, probe
        from probekit.inputs.images import ImageSet
        from probekit.metric import Metric

        out = []
        for chunk, pixels, kept, names, labels, decode_s in zip(batch["chunk"], batch["pixels"], batch["kept"],
                                                                batch["names"], batch["labels"], batch["decode_s"],
                                                                strict=True):
            t0 = time.perf_counter()
            done = {"kept": np.asarray(kept, np.int64), "decode_s": float(decode_s), "pid": os.getpid()}
            if pixels.ndim != 4:  # every image of the chunk was unreadable
                out.append(pickle.dumps({**done, "table": None, "empty": True, "probe_s": 0.0}))
                continue
            mets = build_metrics(list(self.metrics))
            x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
            images = ImageSet(names=[str(i) for i in range(len(x))], tensor=x,
                              labels=_labels(labels))
            # whole-set metrics (probes) make no rows of a chunk: their state is merged over the shards
            res = probe(self.pm, images, mets, batch_size=self.batch_size, dtype=self.dtype, label=self.label,
                        partial=True)
            # and dataset-level metrics (CKA) ship their state whatever the chunk holds (a chunk of 2 images has no
            # CKA matrix of its own, but its sums count)
            states = {m.label: m.state_dict() for m in mets
                      if m.whole_set or type(m).dataset_result is not Metric.dataset_result}
            maps = {k: v for k, v in res.arrays.items() if k.rsplit("/", 1)[1] not in states}
            names = [str(n) for n in json.loads(str(names))]
            if self.rows_dir is None:  # the driver writes the rows
                rows: dict[str, Any] = {"table": res.table}
            else:  # written here; only their files' names, sizes and digests travel
                rows = {"table": None, "files": self._write_rows(int(chunk), res.table, names, images.labels, mets)}
            out.append(pickle.dumps({**done, **rows, "empty": False, "names": names, "arrays": maps, "states": states,
                                     "meta": res.meta, "probe_s": time.perf_counter() - t0}))
        return {"chunk": np.asarray(batch["chunk"]), "payload": np.array(out, dtype=object)}
