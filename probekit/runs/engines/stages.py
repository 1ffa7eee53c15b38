"""The Ray engine's stages, run in Ray worker processes (no Ray import here).

- :func:`decode_chunk`: a CPU stage; one chunk (one batch of a shard) decoded and put through
  the model's own preprocessing, exactly as the local engine's DataLoader does (the same
  :class:`~probekit.inputs.images.ImageSet` dataset and collate, so unreadable images are skipped
  or stop the run the same way).
- :class:`ProbeReplica`: the callable class of a model's actor pool; it loads the model once
  (seeded as the local engine seeds it) and probes one chunk per call with the local engine
  itself, returning the chunk's per-image rows and the state of dataset-level metrics (and of
  metrics whose rows need the whole set, e.g. k-NN: the driver makes their rows from the merged state).

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

__all__ = ["decode_chunk", "ProbeReplica"]


def decode_chunk(row: dict[str, Any], transform: Any) -> dict[str, Any]:
    """``{chunk, images (a pickled ImageSet)}`` -> ``{chunk, pixels [b, C, H, W], kept, labels, decode_s}``
    (``labels``: the kept images' labels as a JSON list, None for an unlabelled set: one plain string
    column, whatever Arrow makes of lists of strings)."""
    from probekit.inputs.images import collate

    t0 = time.perf_counter()
    images = pickle.loads(row["images"])
    ds = images.dataset(transform)
    kept, x = collate([ds[j] for j in range(len(images))])
    pixels = np.zeros((0,), np.float32) if x is None else x.numpy()
    labels = None if images.labels is None else json.dumps([str(images.labels[int(i)]) for i in kept])
    return {"chunk": row["chunk"], "pixels": pixels, "kept": kept.numpy().astype(np.int64),
            "labels": labels, "decode_s": time.perf_counter() - t0}


class ProbeReplica:
    """One replica of one model: loads it once, probes a chunk per call."""

    def __init__(self, model: str, label: str, options: dict, seed: int, device: str | None,
                 metrics: list[tuple[str, dict]], dtype: str, batch_size: int):
        import torch

        from probekit.inputs.memory import tame
        from probekit.models import load

        tame()
        with torch.random.fork_rng(devices=[]):  # the local engine's seeding: the same random-init weights
            torch.manual_seed(seed)
            self.pm = load(model, label=label, device=device, **options)
        self.label, self.metrics, self.dtype, self.batch_size = label, metrics, dtype, batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from probekit.engine.probe import build_metrics, probe
        from probekit.inputs.images import ImageSet
        from probekit.metric import Metric

        out = []
        for pixels, kept, labels, decode_s in zip(batch["pixels"], batch["kept"], batch["labels"], batch["decode_s"],
                                                  strict=True):
            t0 = time.perf_counter()
            done = {"kept": np.asarray(kept, np.int64), "decode_s": float(decode_s), "pid": os.getpid()}
            if pixels.ndim != 4:  # every image of the chunk was unreadable
                out.append(pickle.dumps({**done, "table": None, "probe_s": 0.0}))
                continue
            mets = build_metrics(list(self.metrics))
            x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
            images = ImageSet(names=[str(i) for i in range(len(x))], tensor=x,
                              labels=None if labels is None else [str(v) for v in json.loads(str(labels))])
            # whole-set metrics (probes) make no rows of a chunk: their state is merged over the shards
            res = probe(self.pm, images, mets, batch_size=self.batch_size, dtype=self.dtype, label=self.label,
                        partial=True)
            # and dataset-level metrics (CKA) ship their state whatever the chunk holds (a chunk of 2 images has no
            # CKA matrix of its own, but its sums count)
            states = {m.label: m.state_dict() for m in mets
                      if m.whole_set or type(m).dataset_result is not Metric.dataset_result}
            maps = {k: v for k, v in res.arrays.items() if k.rsplit("/", 1)[1] not in states}
            out.append(pickle.dumps({**done, "table": res.table, "arrays": maps, "states": states,
                                     "meta": res.meta, "probe_s": time.perf_counter() - t0}))
        return {"chunk": np.asarray(batch["chunk"]), "payload": np.array(out, dtype=object)}
