"""Per-image maps (``cls_map``, ``rollout``, ``aggregated_map``) averaged by image label: one map per class.

Walmer et al. 2023 average attention maps per class to ask whether heads look at different places
for different object classes. A map metric keeps every image's map (``Results.arrays``
``[N, L, ...]``, in the images' order) and a labelled source puts each image's ``label`` in the
table, so the per-class mean is a group-by over the arrays' first axis: :func:`maps_by_label`;
:func:`class_maps` draws it, one panel per class at one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from probekit.errors import ConfigError
from probekit.inputs.view import is_view
from probekit.results import Results
from probekit.views.plots._common import WIDTH, _as_results, _layout, _sns
from probekit.views.plots.labels import MAX_LABELS
from probekit.views.plots.maps import _to_grid

__all__ = ["LabelMaps", "maps_by_label", "class_maps"]


class LabelMaps(NamedTuple):
    """The mean map per label: ``maps[i]`` (``[L, ...]``) over the ``counts[i]`` images of ``labels[i]``."""

    labels: list[str]
    maps: np.ndarray
    counts: np.ndarray


def _map_key(res: Results, metric: str, model: str | None) -> str:
    keys = [k for k in res.arrays if not is_view(k) and k.rsplit("/", 1)[1] == metric]
    if not keys:
        have = sorted({k.rsplit("/", 1)[1] for k in res.arrays if not is_view(k)})
        raise ConfigError(f"No per-image maps of {metric!r} in these results (maps: {', '.join(have) or 'none'}); "
                          "run a map metric such as cls_map, rollout or aggregated_map.")
    if model is None:
        if len(keys) > 1:
            models = ", ".join(k.rsplit("/", 1)[0] for k in keys)
            raise ConfigError(f"{metric!r} has maps of several models ({models}); pass model=... to choose one.")
        return keys[0]
    key = f"{model}/{metric}"
    if key not in keys:
        raise ConfigError(f"No {metric!r} maps for model {model!r}; there are: "
                          f"{', '.join(k.rsplit('/', 1)[0] for k in keys)}.")
    return key


def _image_labels(res: Results, model: str, n: int) -> np.ndarray:
    """Each map row's label, from the table's ``label`` column (rows in the arrays' image order)."""
    if "label" not in res.columns:
        raise ConfigError("These results have no labels: probe a labelled source (class folders, a manifest with a "
                          "label column, shards with .cls, a dataset with label_column), or pass labels=[...].")
    t = res.rows(models=[model])  # (of a run on disk, that model's rows only)
    first = t.drop_duplicates("image")  # image-major rows: the arrays' order
    if len(first) != n:
        raise ConfigError(f"The table has {len(first)} images of {model!r} but its maps have {n}: a run of map "
                          "metrics alone has no table rows to read labels from. Add a scalar metric (e.g. mad) "
                          "to the run, or pass labels=[...] with one label per map, in the images' order.")
    return first["label"].astype(str).to_numpy()


def maps_by_label(results: Results, metric: str = "cls_map", *, model: str | None = None,
                  labels: Sequence | None = None) -> LabelMaps:
    """The mean of ``metric``'s per-image maps over each label's images, labels sorted.

    Args:
        metric: a map metric label with per-image arrays ``[N, L, ...]``.
        model: whose maps (default: the only model that has them).
        labels: one label per map row, in the images' order (default: the table's ``label``
            column, which labelled sources give).

    Raises:
        ConfigError: no such maps, several models and none chosen, or no labels (an unlabelled
            run, or a map-only run whose table has no rows to read them from).

    >>> import pandas as pd
    >>> table = pd.DataFrame({"model": "m", "image": ["a", "b", "c"], "layer": 0, "head": 0, "metric": "mad",
    ...                       "value": 1.0, "label": ["cat", "dog", "cat"]})
    >>> res = Results(table, {"m/cls_map": np.arange(3.0).reshape(3, 1, 1)})
    >>> out = maps_by_label(res)
    >>> out.labels, out.maps[:, 0, 0].tolist(), out.counts.tolist()
    (['cat', 'dog'], [1.0, 1.0], [2, 1])
    """
    res = _as_results(results)
    key = _map_key(res, metric, model)
    arr = np.asarray(res.arrays[key], dtype=np.float64)
    if labels is None:
        lab = _image_labels(res, key.rsplit("/", 1)[0], arr.shape[0])
    else:
        lab = np.asarray([str(v) for v in labels])
        if len(lab) != arr.shape[0]:
            raise ConfigError(f"labels has {len(lab)} entries for {arr.shape[0]} maps of {key!r}: give one per image.")
    names, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    sums = np.zeros((len(names), *arr.shape[1:]))
    np.add.at(sums, inverse, arr)
    return LabelMaps([str(n) for n in names], sums / counts.reshape(-1, *([1] * (arr.ndim - 1))), counts)


def class_maps(results: Results, metric: str = "cls_map", *, model: str | None = None, layer: int = -1,
               labels: Sequence | None = None, max_labels: int = MAX_LABELS, ax=None):
    """One panel per class: ``metric``'s mean map over that class's images at ``layer`` (heads
    averaged), one colour scale for all; the :data:`~probekit.views.plots.labels.MAX_LABELS`
    most frequent classes (``max_labels``).

    Raises:
        ConfigError: as :func:`maps_by_label` (an unlabelled run among them).

    Returns:
        ``(fig, axes)``.
    """
    _, plt = _sns()
    res = _as_results(results)
    key = _map_key(res, metric, model)
    by = maps_by_label(res, metric, model=key.rsplit("/", 1)[0], labels=labels)
    order = np.argsort(-by.counts, kind="stable")[:max_labels]
    lay = _layout(res, key.rsplit("/", 1)[0])
    grids = [_to_grid(by.maps[i][layer], lay) for i in order]
    if ax is None:
        cols = min(len(order), 4)
        rows = -(-len(order) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, WIDTH / cols * rows + 0.4), squeeze=False,
                                 layout="constrained")
        axes = axes.ravel()
        for a in axes[len(order):]:
            a.set_visible(False)
    else:
        fig, axes = ax.figure, np.array([ax])
        order, grids = order[:1], grids[:1]
    vmax = max((float(np.nanmax(g)) for g in grids if np.isfinite(g).any()), default=1.0) or 1.0
    mappable = None
    for a, i, g in zip(axes, order, grids, strict=False):
        mappable = a.imshow(g, cmap="inferno", interpolation="nearest", vmin=0.0, vmax=vmax)
        a.set_title(f"{by.labels[i]} ({by.counts[i]})", fontsize=7)
        a.set_xticks([])
        a.set_yticks([])
    n_layers = by.maps.shape[1]
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes[: len(order)]), shrink=0.8, pad=0.01,
                     label=f"{metric}, class mean (one scale for all)")
    if ax is None:
        fig.suptitle(f"{metric} by class: {key.rsplit('/', 1)[0]}, layer {layer % n_layers} of 0..{n_layers - 1}",
                     fontsize=8)
    return fig, axes[: len(order)]
