"""What a model saw: its preprocessed input as an RGB picture, the background of every map.

Why: an attention map lies over the model's input, which is the image after the model's own
preprocessing (EXIF rotation, resize, centre crop, another aspect ratio); the file on disk is a
different picture. Preprocessing ends in a per-channel affine normalisation ``(x - mean) / std``
whose constants differ by library and are not always known (ONNX graphs, plugins), so each
channel is stretched back to 0..255: that undoes any such normalisation up to contrast.

The engine keeps the views of the first :data:`VIEW_IMAGES` images of a model that has
per-image maps in ``Results.arrays`` under :func:`view_key` (uint8 ``[images, H, W, 3]``), so
the maps figure is drawn from a run directory alone; the report's explorer draws the same view.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["VIEW", "VIEW_NAMES", "VIEW_IMAGES", "view_key", "names_key", "is_view", "rgb", "join_arrays",
           "metric_arrays"]

VIEW = "#input"  # the array key's metric part for a model's input views (no metric label starts with '#')
VIEW_NAMES = "#names"  # ... and for the names of the images those views show, in the same order
VIEW_IMAGES = 4  # the images the maps figure draws by default


def view_key(model: str) -> str:
    """The ``Results.arrays`` key of ``model``'s input views."""
    return f"{model}/{VIEW}"


def names_key(model: str) -> str:
    """The ``Results.arrays`` key of the names of the images ``model``'s views show (the images its
    map arrays begin with: those decoded, in order, so an image that failed to decode shifts nothing)."""
    return f"{model}/{VIEW_NAMES}"


def is_view(key: str) -> bool:
    """Whether an ``arrays`` key holds input views or their names rather than a metric's arrays."""
    return key.rsplit("/", 1)[-1] in (VIEW, VIEW_NAMES)


def rgb(x: Any) -> np.ndarray:
    """``[..., C, H, W]`` model input (tensor or array) -> ``[..., H, W, 3]`` uint8, each image's
    channels stretched to 0..255 (one channel is repeated; channels past the third are dropped)."""
    a = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    a = a.astype(np.float64)
    lo = a.min(axis=(-2, -1), keepdims=True)
    hi = a.max(axis=(-2, -1), keepdims=True)
    out = np.rint((a - lo) / np.where(hi > lo, hi - lo, 1.0) * 255).astype(np.uint8)
    out = np.moveaxis(out, -3, -1)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out[..., :3])


def join_arrays(key: str, pieces: list[np.ndarray]) -> np.ndarray:
    """Several parts' arrays under one key as one, concatenated over images.

    Input views are kept once when the parts hold the same ones (one model's parts of several
    metrics), else concatenated and cut to the first :data:`VIEW_IMAGES` (consecutive blocks of
    images: each block's views are its first images, so the first ones overall come first).
    """
    if len(pieces) == 1:
        return pieces[0]
    if is_view(key):
        first = pieces[0]
        if all(p.shape == first.shape and np.array_equal(p, first) for p in pieces[1:]):
            return first
        return np.concatenate(pieces)[:VIEW_IMAGES]
    return np.concatenate(pieces)


def metric_arrays(arrays: dict[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    """The arrays of metric ``label`` and, beside them, their model's input views (a part that
    holds maps can then be drawn on its own)."""
    out = {k: v for k, v in arrays.items() if not is_view(k) and k.rsplit("/", 1)[1] == label}
    for k in list(out):
        model = k.rsplit("/", 1)[0]
        for vk in (view_key(model), names_key(model)):
            if vk in arrays:
                out[vk] = arrays[vk]
    return out
