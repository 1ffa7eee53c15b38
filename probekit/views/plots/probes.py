"""What each layer's features know: probe accuracy against depth (representation probes).

A probe metric (``knn``, ``linear_probe``: metrics that read the images' labels, ``needs_labels``)
gives each image, per layer, 1.0 where its held-out prediction was right and 0.0 where it was
wrong, so the per-layer mean over images is the accuracy and its 95% CI over images comes from
the same summaries as every metric's. :func:`probe_accuracy` draws that as the per-layer overlay
does (a line per model, colour per training kind, the CI band), with chance marked: the share
of the most frequent label among the images the metric tested (a classifier that always answers
the majority class reaches it), and each model's best layer ringed.
"""

from __future__ import annotations

import pandas as pd

from probekit.errors import ConfigError
from probekit.results import Results, summarize
from probekit.views.plots._common import _as_results, _metric, _metric_meta, _rows, _title
from probekit.views.plots.aggregates import image_labels, layer_summary, metric_models

__all__ = ["probe_accuracy", "is_probe", "probe_metrics", "probe_display", "chance_level", "layer_accuracy",
           "metric_chance"]


def is_probe(results: Results, metric: str) -> bool:
    """Whether ``metric`` is a probe's per-image correctness (its metric reads labels and has no heads;
    when its plugin is not installed here: its unit is ``accuracy``)."""
    m = _metric(results, metric)
    if m is not None:
        return bool(getattr(m, "needs_labels", False)) and not m.per_head and not m.is_map
    return str(_metric_meta(results, metric).get("unit") or "") == "accuracy"


def probe_display(results: Results, metric: str) -> str:
    """A probe's display name (``k-NN accuracy``), with its label's options when not the defaults."""
    m = _metric(results, metric)
    base = _metric_meta(results, metric).get("name") or (m.name if m is not None else metric)
    name = _metric_meta(results, metric).get("display_name") or (m.display_name if m is not None else metric)
    return name if metric == base else f"{name} {metric[len(base):]}"


def probe_metrics(results: Results) -> list[str]:
    """The probe metrics of ``results`` that have rows and labels, in table order."""
    if "label" not in results.columns:
        return []
    return [m for m in results.metrics if is_probe(results, m)]


def chance_level(table: pd.DataFrame, metric: str | None = None) -> float:
    """The majority class's share of the labels of the images with rows (of ``metric``, if given).

    >>> t = pd.DataFrame({"image": list("abcd"), "label": ["x", "x", "x", "y"], "metric": "knn"})
    >>> chance_level(t)
    0.75
    """
    t = table if metric is None else table[table["metric"].astype(str) == metric]
    labels = t.drop_duplicates("image")["label"].astype(str)
    if labels.empty:
        return float("nan")
    return float(labels.value_counts(normalize=True).iloc[0])


def metric_chance(results: Results, metric: str) -> float:
    """:func:`chance_level` of ``metric``'s rows; of results on disk, from the images' labels read part
    by part (never the rows of every model at once)."""
    if results.source is None:
        return chance_level(results.rows(metric))
    labels = image_labels(results, metric)
    return float(labels.value_counts(normalize=True).iloc[0]) if len(labels) else float("nan")


def layer_accuracy(results: Results, metric: str) -> pd.DataFrame:
    """Per model and layer: accuracy (mean over the tested images), its 95% CI over images, the
    number of images ``n`` and ``best`` (True at each model's most accurate layer; the first on ties)."""
    if results.source is not None:  # on disk: a model's per-image values at a time, summarised and dropped
        names = metric_models(results, metric)
        s = layer_summary(results, metric, names)
    else:
        t = _rows(results, metric, None)
        names = list(dict.fromkeys(t["model"]))
        per = t.groupby(["model", "image", "layer"], observed=True)["value"].mean().reset_index()
        s = summarize(per.assign(metric=metric, head=-1))
    s = s[["model", "layer", "mean", "ci_low", "ci_high", "n"]]
    s = s.assign(model=s["model"].astype(str))
    rank = {m: i for i, m in enumerate(names)}  # the table's model order
    s = s.sort_values(["model", "layer"], key=lambda c: c.map(rank) if c.name == "model" else c,
                      kind="stable").reset_index(drop=True)
    s["best"] = s.index.isin(s.groupby("model", sort=False)["mean"].idxmax().dropna())  # first of ties
    return s.rename(columns={"mean": "accuracy"})


def probe_accuracy(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """Probe accuracy against layer: a line per model with its 95% CI band over images, chance
    (the majority label's share) as a dotted line, and each model's best layer ringed.

    Args:
        results: Results (or their long table) of a labelled run with a probe metric.
        metric: the probe's label (default: the first probe metric).
        models: the models to draw (default: all).
        ax: a matplotlib axes to draw on.

    Raises:
        ConfigError: no labels, or ``metric`` is not a probe metric.

    Returns:
        ``(fig, ax)``.
    """
    from probekit.views.plots.overlay import layer_overlay  # the per-layer lines and bands, drawn once for all figures

    res = _as_results(results)
    probes = probe_metrics(res)
    if metric is None:
        if not probes:
            raise ConfigError("These results hold no probe metric with labels (knn, linear_probe on a labelled "
                              "image set).")
        metric = probes[0]
    elif metric not in probes:
        raise ConfigError(f"{metric!r} is not a probe metric of a labelled run; these results have: "
                          f"{', '.join(probes) or 'none'}.")
    fig, a = layer_overlay(res, metric, models=models, ax=ax)
    acc = layer_accuracy(res, metric)
    if models is not None:
        acc = acc[acc["model"].isin(list(models))]
    colours = {line.get_label(): line.get_color() for line in a.get_lines()}
    for name, d in acc[acc["best"]].groupby("model", sort=False):
        a.scatter(d["layer"], d["accuracy"], s=70, facecolors="none", linewidths=1.2, zorder=3,
                  edgecolors=colours.get(_title(res, str(name)), "0.2"))
    chance = metric_chance(res, metric)
    a.chance = chance  # the line's value, for tests and captions
    a.axhline(chance, ls=":", lw=1.2, color="0.35", zorder=0, label=f"chance: majority label ({chance:.1%})")
    a.scatter([], [], s=70, facecolors="none", edgecolors="0.2", linewidths=1.2, label="best layer")
    a.set_ylim(min(0.0, chance - 0.05), 1.02)
    a.set_ylabel(f"{probe_display(res, metric)} (share of held-out images right)")
    a.legend(fontsize=7, frameon=False)
    a.set_title("accuracy per layer on held-out images, 95% CI over images", fontsize=8)
    return fig, a
