"""The attention explorer's part of ``report.html``: its JSON and its binary blob.

Each model's cached arrays (:mod:`probekit.runs.explorer`: uint8 codes of ``sqrt(p)``) go into one
blob as they are; the JSON says where each array starts, its shape, the stored queries and the
backgrounds. The colour scale is shared: per showcase image and layer, the largest code over every
model, head and query (``scale``), so a near-uniform map is drawn as dim as it is next to a peaked
one. The page draws it with ``assets/explorer.js``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

from probekit.runs.record import RunRecord

__all__ = ["explorer_payload", "MAPS"]

#: the arrays the page draws: a query patch's row per head, the CLS (or mean query) row per head, the rollout
MAPS = ("attn", "cls", "rollout")


def _peaks(codes: np.ndarray) -> list[list[int]]:
    """The largest code per image and layer (``codes``: ``[I, L, ...]``)."""
    return codes.reshape(codes.shape[0], codes.shape[1], -1).max(axis=-1).astype(int).tolist()


def _shared(peaks: list[list[list[int]]]) -> list[list[int]]:
    """Per image and layer, the largest of the models' peaks (models may have different depths)."""
    images = max(len(p) for p in peaks)
    out: list[list[int]] = []
    for i in range(images):
        layers = max(len(p[i]) for p in peaks if i < len(p))
        out.append([max(p[i][la] for p in peaks if i < len(p) and la < len(p[i])) for la in range(layers)])
    return out


def explorer_payload(run_dir: Path, record: RunRecord, model_index: dict[str, int]) -> tuple[dict | None, bytes]:
    """The explorer's JSON (shapes, offsets into the blob, shared scales, backgrounds) and its uint8 blob."""
    from probekit.runs.explorer import LEVELS, load

    chunks: list[bytes] = []
    offset = 0
    models: list[dict[str, Any]] = []
    peaks: dict[str, list] = {name: [] for name in MAPS}
    for mrec in record.models:
        arrays = load(run_dir / mrec.explorer) if mrec.explorer else None
        if arrays is None or mrec.label not in model_index:
            continue
        n = len(arrays["names"])
        entry: dict[str, Any] = {
            "model": model_index[mrec.label], "key": f"m{len(models)}", "arrays": {},
            "shape": list(arrays["attn"].shape), "grid": arrays["grid"].tolist(), "patch": arrays["patch"].tolist(),
            "queries": arrays["queries"].tolist(), "query": str(arrays["query"]),
            "images": [str(v) for v in arrays["names"]],
            "bg": ["data:image/jpeg;base64," + base64.b64encode(arrays[f"bg{i}"].tobytes()).decode() for i in range(n)]}
        for name in MAPS:
            raw = np.ascontiguousarray(arrays[name], dtype=np.uint8).tobytes()
            entry["arrays"][name] = [offset, len(raw)]
            chunks.append(raw)
            offset += len(raw)
            peaks[name].append(_peaks(arrays[name]))
        models.append(entry)
    if not models:
        return None, b""
    m0 = models[0]
    h, w = m0["grid"]
    q = len(m0["queries"])
    stored = (f"Stored for {len(m0['images'])} showcase image(s) ({', '.join(m0['images'])}) "
              f"and {len(models)} model(s): every layer and head; "
              f"the attention of {q} query patches of the {h}x{w} grid"
              + (" (all of them)" if q == h * w
                 else " (a sub-grid that fits report.explorer_mb: the nearest stored query is shown, marked by a dot)")
              + " over all patch keys, the CLS row (the mean query's without CLS) per head and the attention rollout "
              f"per layer, each value p stored as round({LEVELS}·√p) in one byte (√p to within 1/{2 * LEVELS}). "
              "Backgrounds are each model's own preprocessed input.")
    scale = {name: _shared(peaks[name]) for name in MAPS}
    return {"models": models, "stored": stored, "levels": LEVELS, "scale": scale}, b"".join(chunks)
