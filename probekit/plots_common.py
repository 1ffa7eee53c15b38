"""What every probekit figure shares: seaborn imported lazily, Results read back (model and
metric metadata, axis labels, the rows of one metric), one colour per training kind, a grid of
panels a paper page wide, and the value of uniform attention (the dashed "no locality" line).

Kept apart from :mod:`probekit.plots` (the per-layer figures) and :mod:`probekit.plots_maps`
(map overlays on images), which both draw on it.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError, ProbekitError
from .results import Results

__all__ = ["uniform_attention_value", "WIDTH"]

WIDTH = 7.0  # inches: a two-column paper page
_NAMES = {"mad": "mean attention distance", "entropy": "attention entropy", "prefix_mass": "prefix-token mass"}


def _sns():
    """seaborn and pyplot, imported on first use (Agg when nothing else is chosen)."""
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND") and "ipykernel" not in sys.modules:
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
    mm = _metric_meta(res, metric)
    name = _NAMES.get(mm.get("name", metric), metric)
    if metric != mm.get("name", metric):
        name = f"{name} {metric[len(mm.get('name', '')):]}"
    unit = mm.get("unit")
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
    t = res.table[res.table["metric"].astype(str) == metric].copy()
    t["model"] = t["model"].astype(str)
    if models is not None:
        t = t[t["model"].isin(list(models))]
    return t


def _palette(res: Results, models: Sequence[str]) -> dict[str, Any]:
    """One colour per training kind (colour-blind-safe), in order of first appearance."""
    sns, _ = _sns()
    kinds = list(dict.fromkeys(_training(res, m) for m in models))
    colours = sns.color_palette("colorblind", max(len(kinds), 3))
    by_kind = dict(zip(kinds, colours))
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
    """MAD of uniform attention over every token for a layout (the "no locality" level).

    Uniform attention gives each of the ``N + prefix`` keys ``1 / (N + prefix)``, so MAD is the
    mean pairwise distance of the ``N`` grid positions (self included, patch size applied per
    axis) times ``N / (N + prefix)``; with ``renormalize`` the prefix mass is dropped.

    Args:
        layout: a :class:`~probekit.tokens.TokenLayout` or its dict (``num_prefix``, ``grid``,
            ``patch_size``), as in ``Results.meta``.
        renormalize, units, queries: the MAD options the values were computed with (``queries="cls"``:
            the mean distance of the patches from the image centre, as MAD measures CLS queries).

    >>> round(uniform_attention_value({"num_prefix": 0, "grid": [14, 14], "patch_size": [16, 16]}), 2)
    116.49
    """
    if not isinstance(layout, dict):
        layout = {"num_prefix": layout.num_prefix, "grid": layout.grid, "patch_size": layout.patch_size}
    h, w = layout["grid"]
    ph, pw = layout["patch_size"] if units == "px" else (1, 1)
    ys, xs = np.divmod(np.arange(h * w), w)
    if queries == "cls":
        dy, dx = (ys - (h - 1) / 2) * float(ph), (xs - (w - 1) / 2) * float(pw)
    else:
        dy = (ys[:, None] - ys[None, :]) * float(ph)
        dx = (xs[:, None] - xs[None, :]) * float(pw)
    mean = float(np.sqrt(dy**2 + dx**2).mean())
    if units == "fraction":
        mean /= max(max(h, w) - 1, 1)
    n = h * w
    return mean if renormalize else mean * n / (n + int(layout["num_prefix"]))


def _reference(res: Results, model: str, metric: str) -> float | None:
    mm = _metric_meta(res, metric)
    lay = _layout(res, model)
    if mm.get("name", metric) != "mad" or not lay:
        return None
    opts = mm.get("options") or {}
    return uniform_attention_value(lay, bool(opts.get("renormalize", False)), opts.get("units", "px"),
                                   opts.get("queries", "patches"))
