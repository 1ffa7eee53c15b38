"""Figures grouped by image label (class folders, manifests, shards: see probekit.inputs.sources).

Whether attention is more local for some classes than others is the question a labelled
image set lets one ask: :func:`label_profile` draws, per model, the per-layer mean over heads
for each label with its 95% CI over that label's images.
"""

from __future__ import annotations

import pandas as pd

from probekit.errors import ConfigError
from probekit.results import Results, summarize
from probekit.views.plots._common import _as_results, _axis_label, _grid, _pick_metric, _rows, _sns

__all__ = ["label_profile", "MAX_LABELS"]

MAX_LABELS = 12  # more lines than this cannot be told apart: the most frequent labels are drawn


def label_profile(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """Per-layer mean over heads, a line per label with a 95% CI band over its images; a panel per model.

    Raises:
        ConfigError: the results have no ``label`` column (the images came from an unlabelled source).

    Returns:
        ``(fig, axes)``.
    """
    _sns()
    res = _as_results(results)
    if "label" not in res.table.columns:
        raise ConfigError("These results have no labels: probe a labelled source (class folders, a manifest "
                          "with a label column, shards with .cls, a dataset with label_column).")
    metric = _pick_metric(res, metric)
    t = _rows(res, metric, models)
    top = t.drop_duplicates("image")["label"].astype(str).value_counts().index[:MAX_LABELS]
    t = t[t["label"].astype(str).isin(top)]
    per_image = t.groupby(["model", "label", "image", "layer"], observed=True)["value"].mean().reset_index()
    s = summarize(per_image.assign(metric=metric, head=-1), by=("model", "label", "layer"))
    names = list(dict.fromkeys(t["model"].astype(str)))
    fig, axes = _grid(len(names), ax, row_height=2.8)
    for a, name in zip(axes, names, strict=False):  # an ax of one's own draws the first model only
        for label in top:
            d = s[(s["model"].astype(str) == name) & (s["label"].astype(str) == label)].sort_values("layer")
            line, = a.plot(d["layer"], d["mean"], marker="o", ms=2, lw=1, label=label)
            a.fill_between(d["layer"], d["ci_low"].fillna(d["mean"]), d["ci_high"].fillna(d["mean"]),
                           color=line.get_color(), alpha=0.15, linewidth=0)
        a.set_title(name, fontsize=8)
        a.set_xlabel("layer")
    axes[0].set_ylabel(_axis_label(res, metric))
    axes[0].legend(fontsize=6, frameon=False, title="label", title_fontsize=6)
    return fig, axes
