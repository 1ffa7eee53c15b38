"""Map metrics (``cls_map``, ``rollout``) drawn over the images they were computed on: a row per
model, a column per image, the patch grid laid over the image as that model preprocessed it (its
input view, stored with the maps: :mod:`probekit.inputs.view`), never over the file on disk."""

from __future__ import annotations

import math

import numpy as np

from probekit.errors import ConfigError
from probekit.inputs.view import VIEW_IMAGES, is_view, names_key, view_key
from probekit.results import Results
from probekit.views.plots._common import WIDTH, _layout, _sns

__all__ = ["attention_maps"]


def _to_grid(m: np.ndarray, layout: dict | None) -> np.ndarray:
    """One image's map as a 2-D patch grid (extra leading axes such as heads are averaged)."""
    m = np.asarray(m, dtype=np.float64)
    while m.ndim > 2 or (m.ndim == 2 and layout and tuple(m.shape) != tuple(layout["grid"]) and m.shape[-1] == 1):
        m = m.mean(0)
    if m.ndim == 1:
        if layout and m.size == layout["grid"][0] * layout["grid"][1]:
            return m.reshape(layout["grid"])
        side = int(round(math.sqrt(m.size)))
        return m.reshape(side, -1) if side * side == m.size else m[None]
    return m


def attention_maps(results: Results, metric: str | None = None, *, images: int = VIEW_IMAGES,
                   layer: int = -1, ax=None):
    """Map metrics over the images: a row per model, a column per image, at one layer.

    Each map lies over the model's own input view of its image (EXIF-rotated, resized and
    cropped as the model saw it), which the engine stores beside the maps for the first
    images; an image without a stored view shows the map alone.

    Args:
        metric: a map metric label (``cls_map``, ``rollout``); default the first in ``arrays``.
        images: how many images to show.
        layer: which stored layer (``-1``: the last).

    Returns:
        ``(fig, axes)``.
    """
    _, plt = _sns()
    if not results.arrays:
        raise ConfigError("These results hold no map arrays (run a map metric such as cls_map or rollout).")
    labels = list(dict.fromkeys(k.rsplit("/", 1)[1] for k in results.arrays if not is_view(k)))
    metric = metric or labels[0]
    keys = [k for k in results.arrays if not is_view(k) and k.rsplit("/", 1)[1] == metric]
    if not keys:
        raise ConfigError(f"No map arrays for {metric!r}; there are: {', '.join(labels)}.")
    n_img = min(images, min(results.arrays[k].shape[0] for k in keys))
    if ax is None:
        fig, axes = plt.subplots(len(keys), n_img, figsize=(WIDTH, WIDTH / n_img * len(keys) + 0.3),
                                 squeeze=False, layout="constrained")
    else:
        fig, axes = ax.figure, np.array([[ax]])
        keys, n_img = keys[:1], 1
    first_names: list[str] | None = None
    # one colour scale for every map of the figure, so a near-uniform map never looks as hot as a peaked one
    shown = [_to_grid(results.arrays[k][c, layer], _layout(results, k.rsplit("/", 1)[0]))
             for k in keys for c in range(n_img)]
    vmax = max((float(np.nanmax(g)) for g in shown if np.isfinite(g).any()), default=1.0) or 1.0
    mappable = None
    for r, key in enumerate(keys):
        model = key.rsplit("/", 1)[0]
        lay = _layout(results, model)
        views = results.arrays.get(view_key(model))
        names = [str(n) for n in results.arrays.get(names_key(model), [])]  # the images of these rows, in order
        for c in range(n_img):
            a = axes[r, c]
            grid = _to_grid(results.arrays[key][c, layer], lay)
            extent = None
            if views is not None and c < len(views):
                h, w = views[c].shape[:2]
                a.imshow(views[c], extent=(0, w, h, 0))  # at the model's input resolution, pixel edges at integers
                # the patch grid covers the input from its top left (a size the patch does not divide is floored)
                extent = (0, lay["grid"][1] * lay["patch_size"][1], lay["grid"][0] * lay["patch_size"][0], 0) \
                    if lay and tuple(lay["grid"]) == grid.shape else (0, w, h, 0)
            mappable = a.imshow(grid, cmap="inferno", alpha=0.6 if extent else 1.0, extent=extent,
                                interpolation="nearest", vmin=0.0, vmax=vmax)
            a.set_xticks([])
            a.set_yticks([])
            if c < len(names) and (r == 0 or names != first_names):
                a.set_title(names[c], fontsize=7)
            if c == 0:
                a.set_ylabel(model, fontsize=7)
        first_names = names if first_names is None else first_names
    if mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01,
                     label=f"{metric} (one scale for all maps)")
    if ax is None:
        n_layers = results.arrays[keys[0]].shape[1]
        fig.suptitle(f"{metric}, layer {layer % n_layers} of 0..{n_layers - 1}", fontsize=8)
    return fig, axes
