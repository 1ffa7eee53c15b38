"""Figures of a comparison, drawn from Results alone (or a run directory's parquet).

Each function takes :class:`~probekit.results.Results` (or its long table) and an optional
matplotlib ``ax``, and returns ``(fig, ax)``, as torchmetrics' ``plot`` does. Sizes suit a
paper page (7 in wide); axis labels carry the metric's unit from ``Results.meta``; colours
come from seaborn's colour-blind-safe palette, one per training kind. seaborn is imported
lazily so the numbers never depend on it.

- :func:`depth_profile`: ViT paper Fig. 7 (x layer, y value, one dot per head, a panel per
  model, shared y) with a dashed line at the value of uniform attention for that layout.
- :func:`layer_overlay`: per-layer mean over heads with a 95% CI band over images.
- :func:`head_heatmap`: layer x head means, one panel per model.
- :func:`summary_points`: per model, the mean at chosen layers with 95% CIs.
- :func:`attention_maps`: map metrics (``cls_map``, ``rollout``) over the images
  (in :mod:`probekit.views.plots.maps`; shared helpers in :mod:`probekit.views.plots._common`).
- :func:`probe_accuracy`: probe metrics (``knn``, ``linear_probe``): accuracy per layer with its
  CI band, chance marked and each model's best layer ringed (:mod:`probekit.views.plots.probes`;
  it replaces the overlay for these metrics).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from probekit._io.atomic import atomic_path, write_text_atomic
from probekit.errors import ConfigError
from probekit.inputs.view import is_view, view_key
from probekit.results import Results, summarize
from probekit.runs.rundir import STAMPS  # written beside the figures: the inputs each was drawn from
from probekit.views.plots._common import (
    _as_results,
    _axis_label,
    _geometry,
    _grid,
    _layout,
    _palette,
    _pick_metric,
    _reference,
    _rows,
    _sns,
    _title,
    uniform_attention_value,
)
from probekit.views.plots.aggregates import head_means, image_means, metric_models
from probekit.views.plots.labels import label_profile
from probekit.views.plots.maps import attention_maps
from probekit.views.plots.overlay import _int_locator, _per_image_layer, layer_overlay
from probekit.views.plots.probes import is_probe, probe_accuracy

__all__ = [
    "depth_profile", "layer_overlay", "head_heatmap", "summary_points", "attention_maps",
    "render_all", "figure_notes", "uniform_attention_value", "label_profile", "probe_accuracy", "KINDS", "plot",
]

KINDS = ("depth", "overlay", "heatmap", "summary", "maps", "labels", "accuracy")


# -- figures -----------------------------------------------------------------------------------
def _head_means(results, metric: str | None, models, figure: str) -> tuple[Results, str, pd.DataFrame, list]:
    """The results, the metric to draw (default ``mad``), its mean over images per model x layer x head
    (head >= 0; columns ``model``, ``layer``, ``head``, ``value``) and the models that have any; of
    results on disk, read a model at a time (:func:`~probekit.views.plots.aggregates.head_means`).

    Raises:
        ConfigError: no per-head rows, so ``figure`` (e.g. "a heatmap") cannot be drawn.
    """
    res = _as_results(results)
    metric = _pick_metric(res, metric)
    if res.source is not None:
        heads = head_means(res, metric, models)
        names = list(dict.fromkeys(heads["model"]))  # in table order
    else:
        t = _rows(res, metric, models)
        t = t[t["head"] >= 0]
        names = list(dict.fromkeys(t["model"]))
        heads = t.groupby(["model", "layer", "head"], observed=True)["value"].mean().reset_index()
    if not names:
        raise ConfigError(f"Metric {metric!r} has no per-head values to draw {figure} from.")
    return res, metric, heads, names


def depth_profile(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """ViT paper Fig. 7: x layer, y value, one dot per head and a panel per model (shared y).

    A dashed line marks the metric's reference value for the model's token layout
    (:meth:`~probekit.Metric.reference_value`; MAD: uniform attention, heads near it attend
    globally, heads far below it locally; entropy: ln N).
    For windowed, pooled and staged models (Swin, SAM, MViTv2) the MAD line follows each
    layer's own uniform value (what its window or pooled key set allows) and dotted vertical
    lines mark where a new stage's grid starts; distances stay in input pixels across stages.

    Args:
        results: Results or their long table.
        metric: a metric label in the results (default ``"mad"``).
        models: the models to draw (default: all, in table order).
        ax: draw every model on this one axes instead of a panel each.

    Returns:
        ``(fig, axes)``: one axes per model (a single axes when ``ax`` was given).
    """
    res, metric, heads, names = _head_means(results, metric, models, "a depth profile")
    fig, axes = _grid(1 if ax is not None else len(names), ax)
    colours = _palette(res, names)
    head_colours = _head_colours(int(heads["head"].max()) + 1)
    for i, name in enumerate(names):
        a = axes[0] if ax is not None else axes[i]
        d = heads[heads["model"] == name]
        cols = [head_colours[h] for h in d["head"]] if ax is None else colours[name]
        a.scatter(d["layer"], d["value"], s=12, c=cols, alpha=0.8, linewidths=0,
                  label=_title(res, name) if ax is not None else None)
        ref = _reference(res, name, metric)
        if isinstance(ref, list):  # windows, pooled keys, stages: the uniform level of each layer
            a.plot(range(len(ref)), ref, ls="--", lw=1, color="0.4", drawstyle="steps-mid",
                   label="uniform attention" if i == 0 else None)
            a.ref_value = ref
        elif ref is not None:
            a.axhline(ref, ls="--", lw=1, color="0.4", label="uniform attention" if i == 0 else None)
            a.ref_value = ref  # the line's value, for tests and captions
        geo = _geometry(res, name)
        a.stage_starts = (geo or {}).get("stage_starts", [])
        for s in a.stage_starts:  # where the grid changes (patch merging, pooled queries)
            a.axvline(s - 0.5, ls=":", lw=0.8, color="0.6")
        if ax is None:
            a.set_title(_title(res, name), fontsize=8)
        a.set_xlabel("layer")
        a.xaxis.set_major_locator(_int_locator())
    for a in (axes[:1] if ax is not None else axes[:: min(len(names), 3)]):
        a.set_ylabel(_axis_label(res, metric))
    if ax is not None:
        ax.legend(fontsize=7, frameon=False)
    else:  # what the colours and lines mean, once for every panel
        _depth_key(fig, axes, head_colours, [int(h) for h in sorted(heads["head"].unique())])
    return fig, (axes[0] if ax is not None else axes)


def _head_colours(n: int) -> list:
    """One colour per head index: the colour-blind palette up to 10 heads, evenly spaced hues beyond
    (never two heads of one panel in one colour)."""
    sns, _ = _sns()
    return list(sns.color_palette("colorblind" if n <= 10 else "husl", n))


def _depth_key(fig, axes, head_colours: list, heads: list[int]) -> None:
    """The depth profile's legend under the panels: a marker per head colour, the dashed reference
    line and the dotted stage boundaries where drawn."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", ms=4, color=head_colours[h], label=f"head {h}") for h in heads]
    if any(getattr(a, "ref_value", None) is not None for a in axes):
        handles.append(Line2D([], [], ls="--", lw=1, color="0.4", label="uniform attention (no locality)"))
    if any(getattr(a, "stage_starts", None) for a in axes):
        handles.append(Line2D([], [], ls=":", lw=0.8, color="0.6", label="new stage"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False,
               handletextpad=0.2, columnspacing=0.9, title="one dot per head (mean over images); colour: head index",
               title_fontsize=7)


def head_heatmap(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """Layer x head means over images, a panel per model with one shared colour scale.

    Args:
        ax: draw the first (or only) model of ``models`` on this axes.

    Returns:
        ``(fig, axes)``.
    """
    sns, _ = _sns()
    res, metric, heads, names = _head_means(results, metric, models, "a heatmap")
    if ax is not None:
        names = names[:1]
    means = heads.set_index(["model", "layer", "head"])["value"]
    vmin, vmax = float(means.min()), float(means.max())
    fig, axes = _grid(len(names), ax, sharey=False, row_height=2.6)
    for i, name in enumerate(names):
        grid = means.loc[name].unstack("head")
        sns.heatmap(grid, ax=axes[i], vmin=vmin, vmax=vmax, cmap="viridis", cbar=i == len(names) - 1,
                    cbar_kws={"label": _axis_label(res, metric)} if i == len(names) - 1 else None)
        axes[i].set_title(name, fontsize=8)
        axes[i].set_xlabel("head")
        axes[i].set_ylabel("layer")
        axes[i].tick_params(labelsize=7, labelrotation=0)
    return fig, (axes[0] if ax is not None else axes)


def _chosen_layers(layers_of_model: list[int], layers) -> dict[int, str]:
    if layers is None:
        n = len(layers_of_model)
        out: dict[int, str] = {}
        for k, i in (("first", 0), ("middle", (n - 1) // 2), ("last", n - 1)):
            out.setdefault(layers_of_model[i], k)  # a 2-layer model has no middle of its own
        return out
    return {int(x): f"layer {int(x)}" for x in layers if int(x) in layers_of_model}


def summary_points(results: Results | pd.DataFrame, metric: str | None = None, *, layers=None,
                   models=None, ax=None):
    """Per model, the mean over heads and images at chosen layers, with 95% CIs over images.

    Args:
        layers: layer indices; default first, middle and last of each model (depths differ).

    Returns:
        ``(fig, ax)``.
    """
    sns, _ = _sns()
    res = _as_results(results)
    metric = _pick_metric(res, metric)
    if res.source is not None:  # on disk: a model's per-image means at a time, summarised and dropped
        names = sorted(metric_models(res, metric, models))
        per_model = ((n, image_means(res, metric, n).assign(model=n)) for n in names)
    else:
        t = _per_image_layer(_rows(res, metric, models))
        names = list(dict.fromkeys(t["model"]))
        per_model = ((n, t[t["model"] == n]) for n in names)
    pieces, ats, wheres = [], [], []
    for _, d in per_model:
        chosen = _chosen_layers(sorted(d["layer"].unique().tolist()), layers)
        d = d[d["layer"].isin(list(chosen))].assign(where=lambda x, chosen=chosen: x["layer"].map(chosen))
        pieces.append(summarize(d.assign(metric=metric, head=-1), by=("model", "where")))
        ats.append(d.groupby(["model", "where"], observed=True)["layer"].first())  # the layer index each point is
        wheres += list(dict.fromkeys(d["where"]))
    s, at = pd.concat(pieces, ignore_index=True), pd.concat(ats)
    order = sorted(dict.fromkeys(wheres), key=lambda w: ("first", "middle", "last").index(w)
                   if w in ("first", "middle", "last") else 3 + int(w.split()[-1]))
    fig, axes = _grid(1, ax, row_height=3.0)
    a = axes[0]
    pal = sns.color_palette("colorblind", max(len(order), 3))
    width = 0.6 / max(len(order), 1)
    for j, where in enumerate(order):
        sw = s[s["where"] == where].set_index("model").reindex(names)
        x = np.arange(len(names)) + (j - (len(order) - 1) / 2) * width
        err = np.vstack([sw["mean"] - sw["ci_low"], sw["ci_high"] - sw["mean"]]).clip(min=0)
        idx = [int(at[(n, where)]) for n in names if (n, where) in at.index]
        same = len(set(idx)) == 1 and not where.startswith("layer")
        label = f"{where} (layer {idx[0]})" if same else where
        a.errorbar(x, sw["mean"], yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2, color=pal[j], label=label)
        if not same and not where.startswith("layer"):  # depths differ: each point names its layer
            for xi, n, m in zip(x, names, sw["mean"], strict=True):
                if (n, where) in at.index and np.isfinite(m):
                    a.annotate(f"L{int(at[(n, where)])}", (xi, m), xytext=(4, 0), textcoords="offset points",
                               fontsize=6, va="center", color=pal[j])
    a.set_xticks(np.arange(len(names)), names, rotation=20, ha="right", fontsize=7)
    a.set_ylabel(_axis_label(res, metric))
    a.legend(fontsize=7, frameon=False, title="layer", title_fontsize=7)
    a.set_title("mean over heads, 95% CI over images", fontsize=8)
    return fig, a


# -- files -------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def save(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem.png`` (200 dpi) and ``stem.svg``, atomically; returns the paths."""
    out = []
    for fmt in ("png", "svg"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=200)  # constrained layout already fits the labels in
        out.append(path)
    return out


def _is_image_map(results: Results, key: str) -> bool:
    """Whether ``results.arrays[key]`` is ``[images, layers, ..., h, w]`` over the model's patch grid."""
    if is_view(key):  # the images under the maps, not a map
        return False
    arr = results.arrays[key]
    lay = _layout(results, key.rsplit("/", 1)[0])
    return arr.ndim >= 4 and (not lay or tuple(arr.shape[-2:]) == tuple(lay["grid"]))


def _stamp(results: Results, metric: str, kind: str, extra: object = None,
           digests: dict[str, bytes] | None = None) -> str:
    """A hash of everything one figure is drawn from: its metric's rows or arrays, and the metadata.

    Why: a cached rerun redraws nothing whose inputs did not change (drawing is most of a cached run).
    """
    import hashlib
    import json

    h = hashlib.sha256(f"{_FIGURE_FORMAT}|{kind}|{metric}".encode())
    if results.source is not None:  # on disk: the bytes of the metric's part files, never its rows in memory
        digests = {} if digests is None else digests  # (one digest per metric for all its figures)
        if metric not in digests:
            digests[metric] = _files_digest(results.source.filter(metrics=[metric]))
        h.update(digests[metric])
    else:
        t = results.rows(metric)
        h.update(pd.util.hash_pandas_object(t.astype({"model": str, "metric": str}), index=False).to_numpy().tobytes())
    drawn_over = {view_key(k.rsplit("/", 1)[0]) for k in results.arrays if k.rsplit("/", 1)[1] == metric} \
        if kind == "maps" else set()
    for k in sorted(results.arrays):
        if k.rsplit("/", 1)[1] == metric or k in drawn_over:
            h.update(k.encode())
            h.update(np.ascontiguousarray(results.arrays[k]).tobytes())
    meta = {k: results.meta.get(k) for k in ("models", "metrics", "images")}
    h.update(json.dumps([meta, extra], sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _files_digest(scan) -> bytes:
    """A hash of the names and bytes of the files ``scan`` reads (its parts in order; a single file whole)."""
    import hashlib

    h = hashlib.sha256()
    files = [(p.path, scan.path / p.path) for p in scan.parts()]
    if not files and scan.path.is_file():  # a single-file results.parquet of an earlier version
        files = [(scan.path.name, scan.path)]
    for name, path in files:
        h.update(name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.digest()


_FIGURE_FORMAT = 4  # bump when a figure's drawing changes: every figure is then redrawn once
_JOBS: dict = {}  # the results and folder the figures being drawn read


def _linked(src: Path, dst: Path) -> Path:
    """``dst`` as the same file as ``src`` (a hard link; a copy where links are refused)."""
    if src != dst:
        import shutil

        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return dst


def _draw_one(job: tuple[str, str]) -> list[Path]:
    """Draw and save one figure of ``_JOBS``."""
    _, plt = _sns()
    kind, metric = job
    results, out_dir = _JOBS["results"], _JOBS["out_dir"]
    fig, _ = (attention_maps if kind == "maps" else _PER_KIND[kind])(results, metric)
    try:
        return save(fig, out_dir / f"{kind}_{_safe(metric)}")
    finally:
        plt.close(fig)


def _draw_all(jobs: list[tuple[str, str]]) -> list[Path]:
    """Draw ``jobs`` in this process, one after the other.

    Not in forked processes: a fork copies the locks that other threads hold (torch's and OpenMP's
    pools, pyarrow's, the C kernel's workers; even a process that only plots has three threads),
    and a child blocked on one never returns. Seen: both drawing children of a test process
    waiting on a futex for minutes, inside matplotlib's font lookup.
    """
    return [p for job in jobs for p in _draw_one(job)]


_PER_KIND = {"depth": depth_profile, "overlay": layer_overlay, "heatmap": head_heatmap, "summary": summary_points,
             "labels": label_profile, "accuracy": probe_accuracy}


def _jobs(results: Results, kinds: list[str], metrics: Iterable[str] | None) -> list[tuple[str, str]]:
    """The ``(kind, metric)`` figures that ``results`` can give, of ``kinds`` and ``metrics`` (None: all)."""
    wanted = None if metrics is None else list(metrics)
    jobs: list[tuple[str, str]] = []
    for metric in [m for m in (wanted or results.metrics) if m in results.metrics]:  # maps: below
        per_head = results.source.filter(metrics=[metric]).has_heads() if results.source is not None else \
            bool((results.rows(metric)["head"] >= 0).any())
        labelled = "label" in results.columns  # label profiles only for a labelled image set
        probe = labelled and is_probe(results, metric)  # accuracy per layer, drawn with chance instead of an overlay
        skip = {"depth", "heatmap"} if not per_head else set()
        skip |= ({"overlay"} if probe else {"accuracy"}) | (set() if labelled else {"labels"})
        jobs += [(kind, metric) for kind in _PER_KIND if kind in kinds and kind not in skip]
    if "maps" in kinds and results.arrays:
        # per-image maps over the patch grid only: not dataset-level arrays such as CKA's [L, L]
        labels = dict.fromkeys(k.rsplit("/", 1)[1] for k in results.arrays if _is_image_map(results, k))
        jobs += [("maps", m) for m in labels if wanted is None or m in wanted]
    return jobs


def plot(results: Results | pd.DataFrame, kind: str = "overlay", metric: str | None = None, *, ax=None, **options):
    """One figure by kind (``Results.plot`` and ``Comparison.plot`` call this); returns the ``Figure``.

    Args:
        kind: one of :data:`KINDS` (``depth``, ``overlay``, ``heatmap``, ``summary``, ``maps``, ``labels``,
            ``accuracy``).
        metric: a metric label (default ``mad``, else the first).
        ax: a matplotlib axes to draw on.
        **options: the figure function's own keywords (``models``; ``layers`` for ``summary``).

    Raises:
        ConfigError: an unknown kind.

    >>> import pandas as pd
    >>> rows = [("m", f"i{i}", layer, 0, "mad", 10.0 * layer + i) for i in range(3) for layer in range(4)]
    >>> fig = plot(pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value"]))
    >>> [line.get_label() for line in fig.axes[0].get_lines()]
    ['m']
    """
    draw = attention_maps if kind == "maps" else _PER_KIND.get(kind)
    if draw is None:
        raise ConfigError(f"Unknown figure kind {kind!r}; choose from {', '.join(KINDS)}.")
    res = _as_results(results)
    fig, _ = draw(res, metric, ax=ax, **options)
    return fig


_NEEDS = {  # what each kind draws, for the note that says why a run has no such figure
    "depth": "per-head values (such as mad's)", "heatmap": "per-head values (such as mad's)",
    "overlay": "per-image values (such as mad's)", "summary": "per-image values (such as mad's)",
    "labels": "per-image values against the images' labels", "maps": "per-image maps over the patch grid "
    "(cls_map, rollout)", "accuracy": "a probe metric's per-image accuracy (knn, linear_probe) on labelled images",
}


def figure_notes(results: Results, kinds: Iterable[str], metrics: Iterable[str] | None = None) -> list[str]:
    """One line for each of ``kinds`` that ``results`` (of ``metrics``, None: all) gives no figure
    of, saying why; empty when every kind gives one."""
    kinds = list(kinds)
    drawn = {k for k, _ in _jobs(results, kinds, metrics)}
    have = list(dict.fromkeys([*results.metrics, *(k.rsplit("/", 1)[1] for k in results.arrays if not is_view(k))]))
    if metrics is not None:
        have = [m for m in have if m in list(metrics)]
    notes = []
    for kind in dict.fromkeys(kinds):
        if kind in drawn or kind not in _NEEDS:
            continue
        if kind == "labels" and results.metrics and "label" not in results.columns:
            why = "this run's images have no labels (class folders or a manifest's label column give them)"
        elif kind == "overlay" and (rows := [m for m in have if m in results.metrics]) and \
                "label" in results.columns and all(is_probe(results, m) for m in rows):
            why = "this run's probe metrics are drawn as accuracy figures (accuracy_*.png), with chance marked"
        else:
            why = f"none of this run's metrics ({', '.join(have) or 'none'}) has any"
        notes.append(f"No {kind} figure: it draws {_NEEDS[kind]}, and {why}.")
    return notes


def render_all(results: Results, out_dir: str | Path, *, kinds: Iterable[str] | None = None,
               metrics: Iterable[str] | None = None, reuse: str | Path | None = None,
               stamps: str | Path | None = None) -> list[Path]:
    """Draw every figure that fits the results into ``out_dir``; returns the files written or kept.

    A figure whose inputs (its metric's rows or arrays, the run's metadata) are those it was last
    drawn from is kept as it is, or linked from ``reuse`` (the folder of the previous figures, when
    drawing into a staging folder); the others are drawn. The inputs of every figure are written to
    ``out_dir/.stamps.json``; the previous ones are read from ``stamps`` (default: that file).

    Args:
        kinds: a subset of :data:`KINDS` (default: all).
        metrics: metric labels to draw, table or map metrics (default: all).

    Raises:
        ConfigError: an unknown kind.
    """
    import json

    _sns()
    kinds = list(KINDS) if kinds is None else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"Unknown figure kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(results, kinds, metrics)
    before = Path(reuse) if reuse is not None else out_dir
    stamps_path = Path(stamps) if stamps is not None else out_dir / STAMPS
    try:
        old = json.loads(stamps_path.read_text())
    except (OSError, ValueError):
        old = {}
    if not isinstance(old, dict):  # planted or damaged: every figure is drawn again
        old = {}
    new, todo, kept = dict(old), [], []
    digests: dict[str, bytes] = {}
    for kind, metric in jobs:
        stem = f"{kind}_{_safe(metric)}"
        new[stem] = _stamp(results, metric, kind, digests=digests)
        files = [before / f"{stem}.{fmt}" for fmt in ("png", "svg")]
        if old.get(stem) == new[stem] and all(f.exists() for f in files):
            kept += [_linked(f, out_dir / f.name) for f in files]
        else:
            todo.append((kind, metric))
    _JOBS.update(results=results, out_dir=out_dir)
    try:
        drawn = _draw_all(todo)
    finally:
        _JOBS.clear()
    write_text_atomic(out_dir / STAMPS, json.dumps(new, indent=1))
    order = {f"{k}_{_safe(m)}": i for i, (k, m) in enumerate(jobs)}
    return sorted(kept + drawn, key=lambda p: (order.get(p.stem, 0), p.suffix))
