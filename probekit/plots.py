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
- :func:`attention_maps`: map metrics (``cls_map``, ``rollout``) over the images.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError, ProbekitError
from .results import Results, summarize

__all__ = [
    "depth_profile", "layer_overlay", "head_heatmap", "summary_points", "attention_maps",
    "render_all", "uniform_attention_value", "KINDS",
]

KINDS = ("depth", "overlay", "heatmap", "summary", "maps")
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
def uniform_attention_value(layout: dict | Any, renormalize: bool = False, units: str = "px") -> float:
    """MAD of uniform attention over every token for a layout (the "no locality" level).

    Uniform attention gives each of the ``N + prefix`` keys ``1 / (N + prefix)``, so MAD is the
    mean pairwise distance of the ``N`` grid positions (self included, patch size applied per
    axis) times ``N / (N + prefix)``; with ``renormalize`` the prefix mass is dropped.

    Args:
        layout: a :class:`~probekit.tokens.TokenLayout` or its dict (``num_prefix``, ``grid``,
            ``patch_size``), as in ``Results.meta``.
        renormalize, units: the MAD options the values were computed with.

    >>> round(uniform_attention_value({"num_prefix": 0, "grid": [14, 14], "patch_size": [16, 16]}), 2)
    116.49
    """
    if not isinstance(layout, dict):
        layout = {"num_prefix": layout.num_prefix, "grid": layout.grid, "patch_size": layout.patch_size}
    h, w = layout["grid"]
    ph, pw = layout["patch_size"] if units == "px" else (1, 1)
    ys, xs = np.divmod(np.arange(h * w), w)
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
    return uniform_attention_value(lay, bool(opts.get("renormalize", False)), opts.get("units", "px"))


# -- figures -----------------------------------------------------------------------------------
def depth_profile(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """ViT paper Fig. 7: x layer, y value, one dot per head and a panel per model (shared y).

    A dashed line marks the value of uniform attention for the model's token layout (MAD
    only): heads near it attend globally, heads far below it locally.

    Args:
        results: Results or their long table.
        metric: a metric label in the results (default ``"mad"``).
        models: the models to draw (default: all, in table order).
        ax: draw every model on this one axes instead of a panel each.

    Returns:
        ``(fig, axes)``: one axes per model (a single axes when ``ax`` was given).
    """
    sns, _ = _sns()
    res = _as_results(results)
    metric = _pick_metric(res, metric)
    t = _rows(res, metric, models)
    t = t[t["head"] >= 0]
    names = list(dict.fromkeys(t["model"]))
    if not names:
        raise ConfigError(f"Metric {metric!r} has no per-head values to draw a depth profile from.")
    heads = t.groupby(["model", "layer", "head"], observed=True)["value"].mean().reset_index()
    fig, axes = _grid(1 if ax is not None else len(names), ax)
    colours = _palette(res, names)
    for i, name in enumerate(names):
        a = axes[0] if ax is not None else axes[i]
        d = heads[heads["model"] == name]
        n_heads = int(d["head"].max()) + 1
        pal = sns.color_palette("colorblind", min(n_heads, 10))
        cols = [pal[h % len(pal)] for h in d["head"]] if ax is None else colours[name]
        a.scatter(d["layer"], d["value"], s=12, c=cols, alpha=0.8, linewidths=0,
                  label=name if ax is not None else None)
        ref = _reference(res, name, metric)
        if ref is not None:
            a.axhline(ref, ls="--", lw=1, color="0.4", label="uniform attention" if i == 0 else None)
            a.ref_value = ref  # the line's value, for tests and captions
        if ax is None:
            a.set_title(f"{name}\n({_training(res, name)})", fontsize=8)
        a.set_xlabel("layer")
        a.xaxis.set_major_locator(_int_locator())
    for a in (axes[:1] if ax is not None else axes[:: min(len(names), 3)]):
        a.set_ylabel(_axis_label(res, metric))
    if ax is not None:
        ax.legend(fontsize=7, frameon=False)
    return fig, (axes[0] if ax is not None else axes)


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
    res = _as_results(results)
    metric = _pick_metric(res, metric)
    t = _rows(res, metric, models)
    names = list(dict.fromkeys(t["model"]))
    s = summarize(_per_image_layer(t).assign(metric=metric, head=-1))
    fig, axes = _grid(1, ax, row_height=3.2)
    a = axes[0]
    colours = _palette(res, names)
    styles, seen = ["-", "--", ":", "-."], {}
    for name in names:
        d = s[s["model"].astype(str) == name].sort_values("layer")
        kind = _training(res, name)
        ls = styles[seen.setdefault(kind, []).__len__() % len(styles)]
        seen[kind].append(name)
        a.plot(d["layer"], d["mean"], ls=ls, marker="o", ms=3, color=colours[name], label=f"{name} ({kind})")
        lo, hi = d["ci_low"].fillna(d["mean"]), d["ci_high"].fillna(d["mean"])
        a.fill_between(d["layer"], lo, hi, color=colours[name], alpha=0.2, linewidth=0)
    a.set_xlabel("layer")
    a.set_ylabel(_axis_label(res, metric))
    a.xaxis.set_major_locator(_int_locator())
    a.legend(fontsize=7, frameon=False)
    a.set_title("mean over heads, 95% CI over images", fontsize=8)
    return fig, a


def head_heatmap(results: Results | pd.DataFrame, metric: str | None = None, *, models=None, ax=None):
    """Layer x head means over images, a panel per model with one shared colour scale.

    Args:
        ax: draw the first (or only) model of ``models`` on this axes.

    Returns:
        ``(fig, axes)``.
    """
    sns, _ = _sns()
    res = _as_results(results)
    metric = _pick_metric(res, metric)
    t = _rows(res, metric, models)
    t = t[t["head"] >= 0]
    names = list(dict.fromkeys(t["model"]))
    if not names:
        raise ConfigError(f"Metric {metric!r} has no per-head values to draw a heatmap from.")
    if ax is not None:
        names = names[:1]
    means = t.groupby(["model", "layer", "head"], observed=True)["value"].mean()
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
    t = _per_image_layer(_rows(res, metric, models))
    names = list(dict.fromkeys(t["model"]))
    picked = []
    for name in names:
        d = t[t["model"] == name]
        chosen = _chosen_layers(sorted(d["layer"].unique().tolist()), layers)
        picked.append(d[d["layer"].isin(list(chosen))].assign(where=lambda x: x["layer"].map(chosen)))
    d = pd.concat(picked, ignore_index=True)
    s = summarize(d.assign(metric=metric, head=-1), by=("model", "where"))
    order = sorted(dict.fromkeys(d["where"]), key=lambda w: ("first", "middle", "last").index(w)
                   if w in ("first", "middle", "last") else 3 + int(w.split()[-1]))
    fig, axes = _grid(1, ax, row_height=3.0)
    a = axes[0]
    pal = sns.color_palette("colorblind", max(len(order), 3))
    width = 0.6 / max(len(order), 1)
    for j, where in enumerate(order):
        sw = s[s["where"] == where].set_index("model").reindex(names)
        x = np.arange(len(names)) + (j - (len(order) - 1) / 2) * width
        err = np.vstack([sw["mean"] - sw["ci_low"], sw["ci_high"] - sw["mean"]]).clip(min=0)
        a.errorbar(x, sw["mean"], yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2, color=pal[j], label=where)
    a.set_xticks(np.arange(len(names)), names, rotation=20, ha="right", fontsize=7)
    a.set_ylabel(_axis_label(res, metric))
    a.legend(fontsize=7, frameon=False, title="layer", title_fontsize=7)
    a.set_title("mean over heads, 95% CI over images", fontsize=8)
    return fig, a


def _to_grid(m: np.ndarray, layout: dict | None) -> np.ndarray:
    """One image's map as a 2-D patch grid (extra leading axes such as heads are averaged)."""
    m = np.asarray(m, dtype=np.float64)
    while m.ndim > 2 or (m.ndim == 2 and layout and tuple(m.shape) != tuple(layout["grid"]) and m.shape[-1] == 1):
        m = m.mean(0)
    if m.ndim == 1:
        if layout and m.size == layout["grid"][0] * layout["grid"][1]:
            return m.reshape(layout["grid"])
        side = int(round(math.sqrt(m.size)))
        return m.reshape(side, -1) if side * side == m.size else m[None]
    return m


def attention_maps(results: Results, metric: str | None = None, *, image_paths: dict | None = None,
                   images: int = 4, layer: int = -1, ax=None):
    """Map metrics over the images: a row per model, a column per image, at one layer.

    Args:
        metric: a map metric label (``cls_map``, ``rollout``); default the first in ``arrays``.
        image_paths: ``{image name: path}`` to draw under the maps (run.json has them).
        images: how many images to show.
        layer: which stored layer (``-1``: the last).

    Returns:
        ``(fig, axes)``.
    """
    _, plt = _sns()
    if not results.arrays:
        raise ConfigError("These results hold no map arrays (run a map metric such as cls_map or rollout).")
    labels = list(dict.fromkeys(k.rsplit("/", 1)[1] for k in results.arrays))
    metric = metric or labels[0]
    keys = [k for k in results.arrays if k.rsplit("/", 1)[1] == metric]
    if not keys:
        raise ConfigError(f"No map arrays for {metric!r}; there are: {', '.join(labels)}.")
    names = (results.meta.get("images") or {}).get("names") or []
    n_img = min(images, min(results.arrays[k].shape[0] for k in keys))
    if ax is None:
        fig, axes = plt.subplots(len(keys), n_img, figsize=(WIDTH, WIDTH / n_img * len(keys) + 0.3),
                                 squeeze=False, layout="constrained")
    else:
        fig, axes = ax.figure, np.array([[ax]])
        keys, n_img = keys[:1], 1
    for r, key in enumerate(keys):
        model = key.rsplit("/", 1)[0]
        lay = _layout(results, model)
        for c in range(n_img):
            a = axes[r, c]
            grid = _to_grid(results.arrays[key][c, layer], lay)
            path = (image_paths or {}).get(names[c]) if c < len(names) else None
            extent = None
            if path and Path(path).exists():
                from PIL import Image

                with Image.open(path) as im:
                    size = tuple(lay["grid"][i] * lay["patch_size"][i] for i in (1, 0)) if lay else (224, 224)
                    img = np.asarray(im.convert("RGB").resize(size))
                a.imshow(img)
                extent = (0, size[0], size[1], 0)
            a.imshow(grid, cmap="inferno", alpha=0.6 if extent else 1.0, extent=extent, interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
            if r == 0 and c < len(names):
                a.set_title(names[c], fontsize=7)
            if c == 0:
                a.set_ylabel(model, fontsize=7)
    if ax is None:
        n_layers = results.arrays[keys[0]].shape[1]
        fig.suptitle(f"{metric}, layer {layer % n_layers} of 0..{n_layers - 1}", fontsize=8)
    return fig, axes


# -- files -------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def save(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem.png`` (200 dpi) and ``stem.svg``, atomically; returns the paths."""
    out = []
    for fmt in ("png", "svg"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        tmp = stem.with_name(f".{stem.name}.{os.getpid()}.tmp.{fmt}")
        fig.savefig(tmp, format=fmt, dpi=200, bbox_inches="tight")
        tmp.replace(path)
        out.append(path)
    return out


def render_all(results: Results, out_dir: str | Path, *, kinds: Iterable[str] | None = None,
               metrics: Iterable[str] | None = None, image_paths: dict | None = None) -> list[Path]:
    """Draw every figure that fits the results into ``out_dir``; returns the files written.

    Args:
        kinds: a subset of :data:`KINDS` (default: all).
        metrics: metric labels to draw (default: all in the table).
        image_paths: ``{image name: path}`` for map overlays.

    Raises:
        ConfigError: an unknown kind.
    """
    _, plt = _sns()
    kinds = list(KINDS) if kinds is None else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"Unknown figure kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    per_kind = {"depth": depth_profile, "overlay": layer_overlay, "heatmap": head_heatmap, "summary": summary_points}
    for metric in list(metrics or results.metrics):
        per_head = bool((results.table.loc[results.table["metric"].astype(str) == metric, "head"] >= 0).any())
        for kind, fn in per_kind.items():
            if kind not in kinds or (kind in ("depth", "heatmap") and not per_head):
                continue
            fig, _ = fn(results, metric)
            paths += save(fig, out_dir / f"{kind}_{_safe(metric)}")
            plt.close(fig)
    if "maps" in kinds and results.arrays:
        for metric in dict.fromkeys(k.rsplit("/", 1)[1] for k in results.arrays):
            fig, _ = attention_maps(results, metric, image_paths=image_paths)
            paths += save(fig, out_dir / f"maps_{_safe(metric)}")
            plt.close(fig)
    return paths
