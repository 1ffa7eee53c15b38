"""What the report's attention explorer needs, captured while a model is loaded.

For a few showcase images, per layer and head: the attention of a sub-grid of query patches
over every patch key, the CLS map (the mean query's for models without CLS) and the rollout.
Rows are quantized to uint8 (each row scaled to its maximum, the scale kept in float32), and the
query sub-grid is as dense as the byte budget allows: a click on any patch shows the nearest
stored query. Capture goes through the adapter's tap, one image and one layer at a time, so it
works for every adapter (ONNX included) and never holds more than one layer's probabilities.

The arrays are cached per model in ``parts/explorer/<key>.npz``; the key covers the model's
part keys (weights, images, versions), the showcase and the budget.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch  # (imported inside capture(), not with the module)

__all__ = ["explorer_key", "capture", "save", "load", "query_stride"]

_FORMAT = 1


def explorer_key(part_keys: dict[str, str], showcase: Sequence[str], budget_bytes: int) -> str:
    """Cache key of one model's explorer arrays (its part keys already name weights, images, versions)."""
    blob = json.dumps({"format": _FORMAT, "parts": sorted(part_keys.values()), "showcase": list(showcase),
                       "budget": int(budget_bytes)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def query_stride(grid: tuple[int, int], layers: int, heads: int, budget_bytes: int) -> int:
    """The smallest stride whose query sub-grid's rows (``layers x heads x queries x patches`` bytes) fit."""
    h, w = grid
    per_query = layers * heads * h * w
    for s in range(1, max(h, w) + 1):
        if math.ceil(h / s) * math.ceil(w / s) * per_query <= budget_bytes:
            return s
    return max(h, w)


def _quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 rows scaled to their own max (last axis), and the scales; a value that is not finite
    (a diverged model's NaN attention) is 0, which a cast to uint8 would leave undefined."""
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    scale = x.max(axis=-1).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.clip(np.rint(x / safe * 255.0), 0, 255).astype(np.uint8), scale


def _background(x) -> bytes:
    """The model's own preprocessed input as a JPEG: the view the maps figure draws too
    (:func:`probekit.inputs.view.rgb`, each channel stretched back to 0..255)."""
    from PIL import Image

    from probekit.inputs.view import rgb

    buf = io.BytesIO()
    Image.fromarray(rgb(x)).save(buf, format="JPEG", quality=85)  # x: [C, H, W]
    return buf.getvalue()


class _Sink:
    """Reduces each layer as it is reported: sub-grid query rows, the CLS (or mean) row, rollout."""

    wants_attention, wants_hidden, layers = True, False, None

    def __init__(self, layout, queries: torch.Tensor, rollout_metric):
        self.layout, self.queries = layout, queries
        self.query = "cls" if "cls" in layout.prefix_kinds else "mean"
        self.roll = rollout_metric(query=self.query)
        self.rows: dict[int, np.ndarray] = {}
        self.cls: dict[int, np.ndarray] = {}

    def attention(self, layer: int, attn) -> None:
        p = attn.probs()[0]  # [H, T, T] float32, one image
        n = self.layout.num_prefix
        self.rows[layer] = p[:, n + self.queries, n:].cpu().numpy()
        if self.query == "cls":
            self.cls[layer] = p[:, self.layout.prefix_kinds.index("cls"), n:].cpu().numpy()
        else:
            self.cls[layer] = p[:, n:, n:].mean(1).cpu().numpy()
        self.roll.on_attention(layer, type(attn)(probs_given=p[None]), self.layout)  # computed once

    def hidden(self, layer, tokens) -> None:  # pragma: no cover - never asked for
        pass


def capture(pm: Any, images: Any, budget_bytes: int) -> dict[str, np.ndarray]:
    """Explorer arrays for ``images`` (an :class:`~probekit.inputs.images.ImageSet`) on a loaded model.

    Returns:
        ``attn [I, L, H, Q, N]`` and ``cls [I, L, H, N]``, ``rollout [I, L, N]`` (uint8) with
        their ``*_scale`` (float32), ``queries [Q]`` (patch indices), ``grid``, ``patch``,
        ``names``, ``query`` ("cls" or "mean") and ``bg<i>`` (JPEG bytes per image).
    """
    import torch

    from probekit.registry import metrics

    rollout_metric = metrics.get("rollout")
    ds = images.dataset(pm.preprocess)
    out: dict[str, Any] = {}
    per_image: list[tuple] = []
    for i in range(len(images)):
        _, x = ds[i]
        x = x[None].to(pm.device)
        layout = pm.layout(x)
        h, w = layout.grid
        if i == 0:
            stride = query_stride((h, w), pm.num_layers, pm.num_heads, max(1, budget_bytes // len(images)))
            ys = np.arange(((h - 1) % stride) // 2, h, stride)
            xs = np.arange(((w - 1) % stride) // 2, w, stride)
            queries = (ys[:, None] * w + xs[None, :]).ravel()
            grid0 = (h, w)
        elif (h, w) != grid0:
            raise ValueError(f"showcase image {images.names[i]} gives a {h}x{w} grid, the first {grid0}")
        sink = _Sink(layout, torch.as_tensor(queries, device=x.device), rollout_metric)
        with torch.inference_mode(), pm.adapter.evaluating(), pm.adapter.tap(sink):
            pm.adapter.forward(x)
        maps = sink.roll.on_batch_end()
        layers = sorted(sink.rows)
        per_image.append((np.stack([sink.rows[layer] for layer in layers]),
                          np.stack([sink.cls[layer] for layer in layers]),
                          np.stack([maps[layer][0].reshape(-1).cpu().numpy() for layer in layers])))
        out[f"bg{i}"] = np.frombuffer(_background(x[0]), dtype=np.uint8)
    for j, name in enumerate(("attn", "cls", "rollout")):
        q, s = _quantize(np.stack([p[j] for p in per_image]))
        out[name], out[f"{name}_scale"] = q, s
    out.update(queries=queries.astype(np.int32), grid=np.array(grid0, np.int32),
               patch=np.array(layout.patch_size, np.int32), names=np.array(list(images.names)),
               query=np.array(sink.query))
    return out


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from probekit._io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        # uint8 rows: the report compresses them once for all models. numpy's stubs let **arrays fill
        # allow_pickle (a bool); the keys are capture()'s
        np.savez(tmp, **arrays)  # type: ignore[arg-type]


def load(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when missing, damaged or not what :func:`capture` writes (then
    they are captured again). Plain arrays only: an object array (a pickle) is refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:
        return None
    return arrays if _as_captured(arrays) else None


def _as_captured(a: dict[str, np.ndarray]) -> bool:
    """Whether ``a`` has the keys, dtypes and shapes :func:`capture` gives (not a planted file's)."""
    kinds = {"attn": "u1", "cls": "u1", "rollout": "u1", "attn_scale": "f4", "cls_scale": "f4",
             "rollout_scale": "f4", "queries": "i", "grid": "i", "patch": "i", "names": "U", "query": "U"}
    if any(k not in a or (a[k].dtype.kind if len(t) == 1 else a[k].dtype.str[1:]) != t for k, t in kinds.items()):
        return False
    n = len(a["names"]) if a["names"].ndim == 1 else -1
    return (a["grid"].shape == a["patch"].shape == (2,) and a["query"].ndim == 0 and a["attn"].ndim == 5
            and a["attn"].shape[0] == n and a["attn"].shape[3] == len(a["queries"])
            and all(f"bg{i}" in a and a[f"bg{i}"].dtype == np.uint8 for i in range(n)))
