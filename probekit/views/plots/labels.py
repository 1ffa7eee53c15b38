"""Figures grouped by image label (class folders, manifests, shards: see probekit.inputs.sources).

Whether attention is more local for some classes than others is the question a labelled
image set lets one ask: :func:`label_profile` draws, per model, the per-layer mean over heads
for each label with its 95% CI over that label's images.
"""

from __future__ import annotations

import pandas as pd

from probekit.errors import ConfigError
from probekit.results import Results, summarize
from probekit.views.plots._common import (
    LABEL_COLOURS,
    _as_results,
    _axis_label,
    _grid,
    _pick_metric,
    _rows,
    _sns,
    _title,
)
from probekit.views.plots.aggregates import image_labels, image_means, metric_models

__all__ = ["label_profile", "MAX_LABELS"]

MAX_LABELS = 12  # more lines than this cannot be told apart: the most frequent labels are drawn


def label_profile(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """Per-layer mean over heads, a line per label with a 95% CI band over its images; a panel per model.

    Labels take their own colours (:data:`~probekit.views.plots._common.LABEL_COLOURS`), none of
    them a model's, and their legend sits under the panels.

    Raises:
        ConfigError: the results have no ``label`` column (the images came from an unlabelled source).

    Returns:
        ``(fig, axes)``.
    """
    _sns()
    res = _as_results(results)
    if "label" not in res.columns:
        raise ConfigError("These results have no labels: probe a labelled source (class folders, a manifest "
                          "with a label column, shards with .cls, a dataset with label_column).")
    metric = _pick_metric(res, metric)
    names, top, counts, s = (_lazy_label_summary if res.source is not None else _label_summary)(res, metric, models)
    fig, axes = _grid(len(names), ax, row_height=2.8)
    from matplotlib.ticker import MaxNLocator

    for a, name in zip(axes, names, strict=False):  # an ax of one's own draws the first model only
        for k, label in enumerate(top):
            d = s[(s["model"].astype(str) == name) & (s["label"].astype(str) == label)].sort_values("layer")
            colour = LABEL_COLOURS[k % len(LABEL_COLOURS)]
            a.plot(d["layer"], d["mean"], marker="o", ms=2, lw=1, color=colour, label=f"{label} ({counts[label]})")
            a.fill_between(d["layer"], d["ci_low"].fillna(d["mean"]), d["ci_high"].fillna(d["mean"]),
                           color=colour, alpha=0.15, linewidth=0)
        a.set_title(_title(res, name), fontsize=8)
        a.set_xlabel("layer")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(_axis_label(res, metric))
    handles, labels = axes[0].get_legend_handles_labels()
    if ax is not None:
        axes[0].legend(fontsize=6, frameon=False, title="label (images)", title_fontsize=6)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=7,
                   frameon=False, title="label (images); band: 95% CI over that label's images", title_fontsize=7)
    return fig, axes


def _label_summary(res: Results, metric: str, models) -> tuple[list[str], pd.Index, pd.Series, pd.DataFrame]:
    """The models drawn, the labels drawn (the most frequent), each label's image count (of those
    drawn), and the summary over each label's images per model and layer; from the rows in memory."""
    t = _rows(res, metric, models)
    top = t.drop_duplicates("image")["label"].astype(str).value_counts().index[:MAX_LABELS]
    t = t[t["label"].astype(str).isin(top)]
    per_image = t.groupby(["model", "label", "image", "layer"], observed=True)["value"].mean().reset_index()
    s = summarize(per_image.assign(metric=metric, head=-1), by=("model", "label", "layer"))
    names = list(dict.fromkeys(t["model"].astype(str)))
    counts = t.drop_duplicates("image")["label"].astype(str).value_counts()
    return names, top, counts, s


def _lazy_label_summary(res: Results, metric: str, models) -> tuple[list[str], pd.Index, pd.Series, pd.DataFrame]:
    """:func:`_label_summary` of results on disk: the images' labels read part by part, then each
    model's per-image means over heads (with their label), summarised and dropped."""
    labels = image_labels(res, metric, models)
    top = labels.value_counts().index[:MAX_LABELS]
    counts = labels[labels.isin(top)].value_counts()
    names, pieces = [], []
    for m in metric_models(res, metric, models):
        per_image = image_means(res, metric, m, label=True)
        per_image = per_image[per_image["label"].isin(top)]
        if len(per_image):
            names.append(m)
            pieces.append(summarize(per_image.assign(model=m, metric=metric, head=-1), by=("model", "label", "layer")))
    s = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=["model", "label", "layer"])
    return names, top, counts, s
