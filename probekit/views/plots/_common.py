"""What every probekit figure shares: seaborn imported lazily, Results read back (model and
metric metadata, axis labels, the rows of one metric), one colour per training kind, a grid of
panels a paper page wide, and the value of uniform attention (the dashed "no locality" line).

Kept apart from :mod:`probekit.views.plots` (the per-layer figures) and :mod:`probekit.views.plots.maps`
(map overlays on images), which both draw on it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from probekit.errors import ConfigError, ProbekitError
from probekit.results import Results

if TYPE_CHECKING:
    from probekit.tokens import TokenLayout  # torch: imported when a figure needs it (_as_layout)

__all__ = ["uniform_attention_value", "WIDTH", "display_name", "LABEL_COLOURS"]

WIDTH = 7.0  # inches: a two-column paper page


def _sns():
    """seaborn and pyplot, imported on first use (Agg when nothing else is chosen)."""
    try:
        import matplotlib

        if ("matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND")
                and "ipykernel" not in sys.modules):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns
    except ImportError as exc:
        raise ProbekitError(
            f"Figures need seaborn and matplotlib ({exc.name} is missing): pip install 'seaborn>=0.13' "
            "matplotlib. The numbers (results.parquet, summary.csv) do not need them."
        ) from None
    return sns, plt


# -- reading Results -----------------------------------------------------------------------------
def _as_results(data: Results | pd.DataFrame) -> Results:
    return data if isinstance(data, Results) else Results(data)


def _model_meta(res: Results, model: str) -> dict:
    models = res.meta.get("models") or {}
    if model in models:
        return models[model] or {}
    if res.meta.get("model") == model:
        return res.meta
    return {}


def _layout(res: Results, model: str) -> dict | None:
    return _model_meta(res, model).get("layout")


def _training(res: Results, model: str) -> str:
    m = _model_meta(res, model)
    return str(m.get("training") or (m.get("model_meta") or {}).get("training") or "unknown")


def _metric_meta(res: Results, metric: str) -> dict:
    return (res.meta.get("metrics") or {}).get(metric) or {}


def _axis_label(res: Results, metric: str) -> str:
    """``display name[options] (unit)``: the metric's own ``display_name``, whatever plugin it is."""
    mm = _metric_meta(res, metric)
    base = mm.get("name", metric)
    m = _metric(res, metric)
    name = mm.get("display_name") or (m.display_name if m is not None else base)
    if metric != base:
        name = f"{name} {metric[len(base):]}"
    unit = mm.get("unit") or (m.unit if m is not None else "")
    return f"{name} ({unit})" if unit else name


def _pick_metric(res: Results, metric: str | None) -> str:
    have = res.metrics
    if metric is None:
        if not have:
            raise ConfigError("These results hold no rows to plot.")
        return "mad" if "mad" in have else have[0]
    if metric not in have:
        raise ConfigError(f"No metric {metric!r} in these results; they hold: {', '.join(have)}.")
    return metric


def _rows(res: Results, metric: str, models: Sequence[str] | None) -> pd.DataFrame:
    t = res.rows(metric).copy()  # results in memory: of results on disk figures read aggregates (.aggregates)
    t["model"] = t["model"].astype(str)
    if models is not None:
        t = t[t["model"].isin(list(models))]
    return t


def display_name(name: str, group: str | None) -> str:
    """``name (group)``, or ``name`` alone when the group says nothing new: unknown, or already
    in the name ("ViT-S/14 random init", never "ViT-S/14 random init (random init)").

    >>> display_name("ViT-S/14 random init", "random init"), display_name("DINOv2", "self-supervised")
    ('ViT-S/14 random init', 'DINOv2 (self-supervised)')
    """
    if not group or group == "unknown" or group.lower() in name.lower():
        return name
    return f"{name} ({group})"


def _title(res: Results, model: str) -> str:
    """A model's name with its training kind, as :func:`display_name` writes it."""
    return display_name(model, _training(res, model))


# Colours of image labels (classes): Paul Tol's "muted" scheme, colour-blind safe and sharing no
# colour with the models' palette (seaborn "colorblind"), so a class never reads as a model.
LABEL_COLOURS = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
                 "#AA4499", "#DDDDDD", "#661100", "#6699CC")


def _palette(res: Results, models: Sequence[str]) -> dict[str, Any]:
    """One colour per training kind (colour-blind-safe), in order of first appearance."""
    sns, _ = _sns()
    kinds = list(dict.fromkeys(_training(res, m) for m in models))
    colours = sns.color_palette("colorblind", max(len(kinds), 3))
    by_kind = dict(zip(kinds, colours, strict=False))  # the palette has at least 3 colours, maybe more than kinds
    return {m: by_kind[_training(res, m)] for m in models}


def _grid(n: int, ax, sharey: bool = True, row_height: float = 2.4):
    _, plt = _sns()
    if ax is not None:
        return ax.figure, np.atleast_1d(ax)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, row_height * rows + 0.4), sharey=sharey,
                             squeeze=False, layout="constrained")
    axes = axes.ravel()
    for a in axes[n:]:
        a.set_visible(False)
    return fig, axes[:n]


# -- the uniform-attention reference ------------------------------------------------------------
def uniform_attention_value(layout: dict | Any, renormalize: bool = False, units: str = "px",
                            queries: str = "patches") -> float:
    """MAD of uniform attention for a layout (the "no locality" level): MAD's :meth:`reference_value`.

    >>> round(uniform_attention_value({"num_prefix": 0, "grid": [14, 14], "patch_size": [16, 16]}), 2)
    116.49
    """
    from probekit.registry import metrics

    mad = metrics.get("mad")(renormalize=renormalize, units=units, queries=queries)
    return mad.reference_value(_as_layout(layout))


def _as_layout(layout: dict | TokenLayout) -> TokenLayout:
    from probekit.tokens import TokenLayout  # torch: imported when a figure needs it, not with the CLI

    if isinstance(layout, TokenLayout):
        return layout
    return TokenLayout(num_prefix=int(layout["num_prefix"]), grid=tuple(layout["grid"]),
                       patch_size=tuple(layout["patch_size"]),
                       prefix_kinds=tuple(layout["prefix_kinds"]) if layout.get("prefix_kinds") else None)


def _metric(res: Results, metric: str):
    """The metric instance behind a label in ``res`` (from its name and options), or None when its
    plugin is not installed here or the options no longer validate."""
    from probekit.registry import metrics

    mm = _metric_meta(res, metric)
    name = mm.get("name", metric)
    try:
        return metrics.get(name)(**(mm.get("options") or {}))
    except ProbekitError:
        return None


def _geometry(res: Results, model: str) -> dict | None:
    """Per-layer geometry of a staged, windowed or pooled model (``Results.meta["geometry"]``)."""
    return _model_meta(res, model).get("geometry")


def _reference(res: Results, model: str, metric: str) -> float | list[float] | None:
    """The metric's :meth:`~probekit.Metric.reference_value` for ``model``'s layout (None if it has none);
    for a model with a per-layer geometry (windows, pooled keys, stages), the per-layer values the
    engine recorded (:meth:`~probekit.Metric.reference_value`), else None."""
    m, lay = _metric(res, metric), _layout(res, model)
    if m is None or not lay:
        return None
    geo = _geometry(res, model)
    if geo:  # the engine recorded each metric's value per layer (windows, pooled keys, stages)
        refs = (geo.get("references") or {}).get(metric)
        if refs is None or all(v is None for v in refs):
            return None
        return [float("nan") if v is None else float(v) for v in refs]
    ref = m.reference_value(_as_layout(lay))
    return None if ref is None else float(ref)
