"""What the per-layer figures and the report draw, of results on disk, without one metric's rows for
every model in memory (issue 24).

Of results read lazily (``Results.source``, a :class:`~probekit.results.dataset.ResultsScan`) each
aggregate is read one model at a time, that model's parts of the metric one after the other:
per-head means (``model x layer x head``), per-image means over heads (``image x layer``, of one
model; the figures summarise them over images and drop them) and the images' labels. Groups that
span two parts (an image's heads split between them) merge their sums and counts. The figures of
results in memory keep reading their rows as before; these give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from probekit.results import Results, summarize

__all__ = ["metric_models", "head_means", "image_means", "image_labels", "layer_summary"]


def metric_models(res: Results, metric: str, models: Sequence[str] | None = None) -> list[str]:
    """The models with rows of ``metric`` (of ``models``, if given), in table order."""
    names = res.source.filter(metrics=[metric]).models
    return names if models is None else [m for m in names if m in list(models)]


def _parts(res: Results, metric: str, model: str, columns: list[str], where=None) -> Iterator[pd.DataFrame]:
    """One model's rows of ``metric`` (``columns``), a part at a time."""
    for _, _, t in res.source.filter(models=[model], metrics=[metric]).iter_parts(columns, where=where):
        yield t


def _sums(frames: Iterator[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """``sum`` and ``count`` of ``value`` per ``keys`` over ``frames``; a group may span several."""
    pieces = [t.groupby(keys, observed=True, sort=False)["value"].agg(["sum", "count"]) for t in frames]
    if not pieces:
        return pd.DataFrame({"sum": [], "count": []}, index=pd.MultiIndex.from_arrays([[]] * len(keys), names=keys))
    both = pd.concat(pieces)
    if both.index.has_duplicates:
        both = both.groupby(level=keys, sort=False).sum()
    return both.sort_index()


def _means(sums: pd.DataFrame) -> pd.DataFrame:
    with np.errstate(invalid="ignore", divide="ignore"):  # a group of NaN only: NaN, as pandas' mean gives
        value = sums["sum"].to_numpy(dtype=np.float64) / sums["count"].to_numpy(dtype=np.float64)
    return sums.index.to_frame(index=False).assign(value=value)


def head_means(res: Results, metric: str, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Per model, layer and head (head >= 0), the mean over images: columns ``model``, ``layer``,
    ``head``, ``value``, models in table order."""
    import pyarrow.compute as pc

    out = []
    for m in metric_models(res, metric, models):
        d = _means(_sums(_parts(res, metric, m, ["layer", "head", "value"], pc.field("head") >= 0), ["layer", "head"]))
        if len(d):
            out.append(d.assign(model=m)[["model", "layer", "head", "value"]])
    if not out:
        return pd.DataFrame({"model": [], "layer": [], "head": [], "value": []})
    return pd.concat(out, ignore_index=True)


def image_means(res: Results, metric: str, model: str, *, label: bool = False) -> pd.DataFrame:
    """One model's mean over all its rows (every head, -1 included) per image and layer, as the
    figures take it: columns ``image`` (``label``), ``layer``, ``value``."""
    keys = ["image", "label", "layer"] if label else ["image", "layer"]
    frames = (t.assign(image=t["image"].astype(str), **({"label": t["label"].astype(str)} if label else {}))
              for t in _parts(res, metric, model, [*keys, "value"]))
    return _means(_sums(frames, keys))


def image_labels(res: Results, metric: str, models: Sequence[str] | None = None) -> pd.Series:
    """Each image's label (str), indexed by image, in the order the images first appear in the rows of
    ``metric`` (of ``models``; what ``rows.drop_duplicates("image")["label"]`` gives of the table),
    read part by part."""
    seen: dict[str, str] = {}
    scan = res.source.filter(models=None if models is None else list(models), metrics=[metric])
    for _, _, t in scan.iter_parts(["image", "label"]):
        first = t.drop_duplicates("image")
        for image, lab in zip(first["image"].astype(str), first["label"].astype(str), strict=True):
            seen.setdefault(image, lab)
    return pd.Series(list(seen.values()), index=pd.Index(list(seen), name="image"), name="label", dtype=object)


def layer_summary(res: Results, metric: str, models: Sequence[str] | None = None,
                  by: tuple[str, ...] = ("model", "metric", "layer", "head")) -> pd.DataFrame:
    """:func:`~probekit.results.summarize` (``by``) of the per-image means over heads of ``metric``
    (``head`` -1, ``metric`` the label), a model at a time; ``model`` as str, models in table order."""
    out = [summarize(image_means(res, metric, m).assign(model=m, metric=metric, head=-1), by=by)
           for m in metric_models(res, metric, models)]
    if not out:
        return summarize(pd.DataFrame({"model": [], "metric": [], "layer": [], "head": [], "value": []}), by=by)
    return pd.concat(out, ignore_index=True)
