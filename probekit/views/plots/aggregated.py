"""Query-centred aggregated attention maps (the ``aggregated_map`` metric, Walmer et al. 2023, Fig. 3):
a panel per layer and head, the map averaged over the images, the query's own cell marked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from probekit.errors import ConfigError
from probekit.results import Results
from probekit.views.plots._common import WIDTH, _as_results, _sns
from probekit.views.plots.class_maps import _map_key

__all__ = ["aggregated_maps", "aggregated_offset"]


def aggregated_offset(maps: np.ndarray, units: str = "fraction", patch_size: Sequence[int] = (16, 16)) -> np.ndarray:
    """Walmer et al.'s attention offset from aggregated maps ``[..., 2h - 1, 2w - 1]``: the distance
    of each map's centroid (the map renormalized to sum 1) from its centre.

    Fed the mean of ``aggregated_map`` over images, this is ``average_att_offset`` of their code:
    the length of the mean offset vector over queries and images, in ``units`` (``fraction``: grid
    steps / (max(h, w) - 1), their [-1, 1] canvas; ``patch``: grid steps; ``px``: steps x
    ``patch_size``). An all-zero map has offset 0.

    >>> m = np.zeros((3, 5)); m[1, 3] = 1.0     # every query looks one patch right, on a 2 x 3 grid
    >>> aggregated_offset(m).item()              # 1 step / (3 - 1)
    0.5
    """
    maps = np.asarray(maps, dtype=np.float64)
    hh, ww = maps.shape[-2:]
    h, w = (hh + 1) // 2, (ww + 1) // 2
    if units == "px":
        sy, sx = float(patch_size[0]), float(patch_size[1])
    elif units == "fraction":
        sy = sx = 1.0 / max(max(h, w) - 1, 1)
    elif units == "patch":
        sy = sx = 1.0
    else:
        raise ConfigError(f"units={units!r}: use 'fraction', 'patch' or 'px'.")
    total = maps.sum(axis=(-2, -1))
    safe = np.where(total > 0, total, 1.0)
    cy = (maps.sum(-1) * (np.arange(hh) - (h - 1)) * sy).sum(-1) / safe
    cx = (maps.sum(-2) * (np.arange(ww) - (w - 1)) * sx).sum(-1) / safe
    return np.hypot(cy, cx)


def aggregated_maps(results: Results, metric: str = "aggregated_map", *, model: str | None = None,
                    layers: Sequence[int] | None = None, ax=None):
    """A panel per layer (rows) and head (columns): the mean over images of each query-centred map,
    each on its own colour scale (early and late layers differ by orders of magnitude), a cross at
    the query's own cell, the panel titled with Walmer et al.'s offset (:func:`aggregated_offset`, [0, 1]
    grid).

    Args:
        metric: an ``aggregated_map`` label (its options included).
        model: whose maps (default: the only model that has them).
        layers: which layers (default: all).

    Returns:
        ``(fig, axes)``, axes ``[layers, heads]``.
    """
    _, plt = _sns()
    res = _as_results(results)
    key = _map_key(res, metric, model)
    mean = np.nanmean(np.asarray(res.arrays[key], dtype=np.float64), axis=0)  # [L, H, 2h-1, 2w-1]
    if mean.ndim == 3:  # not per head
        mean = mean[:, None]
    picked = list(range(mean.shape[0])) if layers is None else [int(i) % mean.shape[0] for i in layers]
    n_heads = mean.shape[1]
    if ax is None:
        side = min(WIDTH / n_heads, 1.2)
        fig, axes = plt.subplots(len(picked), n_heads, figsize=(max(side * n_heads, 4.5), side * len(picked) + 0.5),
                                 squeeze=False, layout="constrained")
    else:
        fig, axes = ax.figure, np.array([[ax]])
        picked, n_heads = picked[:1], 1
    for r, layer in enumerate(picked):
        for h in range(n_heads):
            a, m = axes[r, h], mean[layer, h]
            real = np.isfinite(m).all(axis=1)  # a staged model's smaller maps are padded with NaN
            m = m[real][:, np.isfinite(m[real]).all(axis=0)] if real.any() else m
            a.imshow(m, cmap="inferno", interpolation="nearest")
            cy, cx = (m.shape[0] - 1) / 2, (m.shape[1] - 1) / 2
            a.plot([cx], [cy], marker="+", color="cyan", ms=4, mew=0.6)
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(f"{aggregated_offset(m).item():.3f}", fontsize=5, pad=1)
            if h == 0:
                a.set_ylabel(f"layer {layer}", fontsize=6)
    if ax is None:
        fig.suptitle(f"{metric}: {key.rsplit('/', 1)[0]}, mean over images\ntitles: the centroid's offset "
                     "(fraction of the grid); +: the query", fontsize=7)
    return fig, axes[: len(picked), :n_heads]
