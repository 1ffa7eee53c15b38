"""The per-layer overlay: each model's mean over heads per layer, with a 95% CI band over images
(``kind="overlay"``), and the selection helpers the other per-layer figures share."""

from __future__ import annotations

import pandas as pd

from probekit.results import Results, summarize
from probekit.views.plots._common import (
    _as_results,
    _axis_label,
    _grid,
    _palette,
    _pick_metric,
    _reference,
    _rows,
    _sns,
    _title,
    _training,
)
from probekit.views.plots.aggregates import layer_summary, metric_models

__all__ = ["layer_overlay"]


def _layer_summary(results: Results | pd.DataFrame, metric: str | None,
                   models) -> tuple[Results, str, list[str], pd.DataFrame]:
    """The results, the metric, its models with rows, and the summary over images of its per-image
    means over heads per model and layer; of results on disk, a model at a time
    (:mod:`probekit.views.plots.aggregates`)."""
    res = _as_results(results)
    metric = _pick_metric(res, metric)
    if res.source is not None:
        names = metric_models(res, metric, models)
        return res, metric, names, layer_summary(res, metric, names)
    t = _rows(res, metric, models)
    names = list(dict.fromkeys(t["model"]))
    return res, metric, names, summarize(_per_image_layer(t).assign(metric=metric, head=-1))


def _int_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _per_image_layer(t: pd.DataFrame) -> pd.DataFrame:
    """Mean over heads for each model x image x layer (what CIs over images are taken of)."""
    return t.groupby(["model", "image", "layer"], observed=True)["value"].mean().reset_index()


def layer_overlay(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """Per-layer mean over heads with a 95% CI band over images; a line per model.

    Colour is the training kind (colour-blind-safe); models of one kind differ by line style.

    Returns:
        ``(fig, ax)``.
    """
    _sns()
    res, metric, names, s = _layer_summary(results, metric, models)
    fig, axes = _grid(1, ax, row_height=3.2)
    a = axes[0]
    colours = _palette(res, names)
    styles = ["-", "--", ":", "-."]
    seen: dict[str, list[str]] = {}  # models drawn so far, per training kind
    for name in names:
        d = s[s["model"].astype(str) == name].sort_values("layer")
        kind = _training(res, name)
        ls = styles[seen.setdefault(kind, []).__len__() % len(styles)]
        seen[kind].append(name)
        a.plot(d["layer"], d["mean"], ls=ls, marker="o", ms=3, color=colours[name], label=_title(res, name))
        lo, hi = d["ci_low"].fillna(d["mean"]), d["ci_high"].fillna(d["mean"])
        a.fill_between(d["layer"], lo, hi, color=colours[name], alpha=0.2, linewidth=0)
    _reference_lines(a, res, names, metric)
    a.set_xlabel("layer")
    a.set_ylabel(_axis_label(res, metric))
    a.xaxis.set_major_locator(_int_locator())
    a.legend(fontsize=7, frameon=False)
    a.set_title("mean over heads, 95% CI over images", fontsize=8)
    return fig, a


def _reference_lines(a, res: Results, names: list[str], metric: str) -> None:
    """Thin dashed lines at each distinct single reference value of ``names`` (uniform attention),
    labelled once; per-layer references (windows, stages) are left to the depth profile."""
    seen: list[float] = []
    for name in names:
        ref = _reference(res, name, metric)
        if isinstance(ref, float) and not any(abs(ref - v) <= 1e-6 * max(1.0, abs(v)) for v in seen):
            a.axhline(ref, ls="--", lw=0.8, color="0.45", zorder=0,
                      label="uniform attention (no locality)" if not seen else None)
            seen.append(ref)
