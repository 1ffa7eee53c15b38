"""Results in a notebook: a small inline SVG chart per metric (per-layer mean over heads with its
95% CI over images, a line and band per model, the uniform-attention level dashed), with the
numbers one click away. No matplotlib: a ``Results`` shows itself as fast as pandas shows a frame.

``Results._repr_html_`` and ``Comparison._repr_html_`` come here (:func:`results_html`).
"""

from __future__ import annotations

import math
from html import escape

import numpy as np
import pandas as pd

from probekit.results import Results, summarize
from probekit.views.plots._common import _axis_label, _metric_meta, _reference, _training, display_name
from probekit.views.plots.aggregates import layer_summary

__all__ = ["results_html", "layer_chart_svg"]

_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")  # the report's
_MAX_LAYERS = 24  # columns of the numbers table


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    step0 = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(step0))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= step0)
    start = math.ceil(lo / step) * step
    return [round(start + k * step, 12) for k in range(int((hi - start) / step + 1e-9) + 1)]


def _layer_summary(res: Results, metric: str) -> pd.DataFrame:
    if res.source is not None:  # on disk: a model at a time (never one metric's rows of every model)
        s = layer_summary(res, metric, by=("model", "layer"))  # models in table order, as categories keep them
        return s.assign(model=pd.Categorical(s["model"], categories=list(dict.fromkeys(s["model"]))))
    t = res.rows(metric)
    per = t.groupby(["model", "image", "layer"], observed=True)["value"].mean().reset_index()
    return summarize(per.assign(metric=metric, head=-1), by=("model", "layer"))


def layer_chart_svg(res: Results, metric: str, width: int = 440, height: int = 200) -> str:
    """One metric's per-layer means over heads, 95% CI band over images, a line per model, as SVG.

    Each model's line is a ``<polyline class="mean">`` and its band a ``<polygon class="ci">``.
    """
    s = _layer_summary(res, metric)
    names = list(dict.fromkeys(s["model"].astype(str)))
    refs: list[float] = []
    for n in names:
        try:
            r = _reference(res, n, metric)
        except Exception:  # a reference that cannot be computed for this layout is left out
            r = None
        if isinstance(r, float) and np.isfinite(r) and all(abs(r - v) > 1e-6 * max(1.0, abs(v)) for v in refs):
            refs.append(r)
    vals = np.concatenate([s[c].to_numpy(dtype=float) for c in ("mean", "ci_low", "ci_high")] + [np.array(refs)])
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    layers = s["layer"].to_numpy()
    x0, x1 = float(layers.min()) - 0.3, float(layers.max()) + 0.3
    key_rows = math.ceil((len(names) + (1 if refs else 0)) / 2)
    ml, mr, mt, mb = 46, 8, 6, 30 + 14 * key_rows
    h = height + 14 * key_rows

    def X(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * (width - ml - mr)

    def Y(v: float) -> float:
        return h - mb - (v - lo) / (hi - lo) * (h - mt - mb)

    out: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" class="probekit-chart" '
           f'style="font:10px sans-serif">']
    for t in _ticks(lo, hi):
        out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 4}" y="{Y(t) + 3:.1f}" text-anchor="end">{t:g}</text>')
    every = max(1, math.ceil((layers.max() - layers.min() + 1) / 12))
    for layer in range(int(layers.min()), int(layers.max()) + 1, every):
        out.append(f'<text x="{X(layer):.1f}" y="{h - mb + 12}" text-anchor="middle">{layer}</text>')
    out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{h - mb}" y2="{h - mb}" stroke="#999"/>'
               f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{h - mb}" stroke="#999"/>'
               f'<text x="{(ml + width - mr) / 2}" y="{h - mb + 24}" text-anchor="middle">layer</text>'
               f'<text x="10" y="{(mt + h - mb) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 10 {(mt + h - mb) / 2})">{escape(_axis_label(res, metric))}</text>')
    for r in refs:
        out.append(f'<line class="ref" x1="{ml}" x2="{width - mr}" y1="{Y(r):.1f}" y2="{Y(r):.1f}" stroke="#666" '
                   f'stroke-dasharray="4 3"><title>uniform attention: {r:.4g}</title></line>')
    key: list[tuple[str, str, str]] = []
    for i, name in enumerate(names):
        c = _COLOURS[i % len(_COLOURS)]
        d = s[s["model"].astype(str) == name].sort_values("layer")
        ok = d[np.isfinite(d["ci_low"]) & np.isfinite(d["ci_high"])]
        if len(ok):
            band = [f"{X(a):.1f},{Y(b):.1f}" for a, b in zip(ok["layer"], ok["ci_low"], strict=True)]
            band += [f"{X(a):.1f},{Y(b):.1f}" for a, b in zip(ok["layer"][::-1], ok["ci_high"][::-1], strict=True)]
            out.append(f'<polygon class="ci" points="{" ".join(band)}" fill="{c}" fill-opacity="0.2"/>')
        pts = " ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b in zip(d["layer"], d["mean"], strict=True) if np.isfinite(b))
        out.append(f'<polyline class="mean" points="{pts}" fill="none" stroke="{c}" stroke-width="1.8">'
                   f'<title>{escape(name)}</title></polyline>')
        key.append((display_name(name, _training(res, name)), c, ""))
    if refs:
        key.append(("uniform attention", "#666", ' stroke-dasharray="4 3"'))
    for k, (label, c, dash) in enumerate(key):
        kx, ky = ml + (k % 2) * (width - ml) / 2, h - mb + 38 + 14 * (k // 2)
        out.append(f'<line x1="{kx:.0f}" x2="{kx + 16:.0f}" y1="{ky - 3}" y2="{ky - 3}" stroke="{c}" stroke-width="2"'
                   f'{dash}/><text x="{kx + 20:.0f}" y="{ky}">{escape(label[:48])}</text>')
    out.append("</svg>")
    return "".join(out)


def _numbers(res: Results, metric: str) -> str:
    s = _layer_summary(res, metric)
    s = s[s["layer"] < _MAX_LAYERS]
    cell = s.assign(txt=[f"{m:.4g} [{a:.3g}, {b:.3g}]" for m, a, b in zip(s["mean"], s["ci_low"], s["ci_high"],
                                                                          strict=True)])
    grid = cell.pivot(index="model", columns="layer", values="txt")
    head = "".join(f"<th>{c}</th>" for c in grid.columns)
    body = "".join(f"<tr><th style='text-align:left'>{escape(str(m))}</th>"
                   + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for m, row in grid.iterrows())
    return f"<table><tr><th>model \\ layer</th>{head}</tr>{body}</table>"


def results_html(res: Results) -> str:
    """``Results`` as a header line and, per metric, a small chart of per-layer means with 95% CIs
    over images; the numbers (mean [CI]) in a collapsed table under it."""
    images = res.meta.get("images") if res.source is not None else None  # a run on disk: its record says
    n_img = images["count"] if isinstance(images, dict) and isinstance(images.get("count"), int) else \
        res.table["image"].nunique() if len(res) else 0
    head = (f"<b>Results</b>: {len(res)} rows, {len(res.models)} model(s) ({escape(', '.join(res.models))}), "
            f"{n_img} image(s), metrics {escape(', '.join(res.metrics))}"
            + (f", maps {escape(', '.join(sorted(res.arrays)))}" if res.arrays else ""))
    parts = []
    for metric in res.metrics if len(res) else []:
        unit = _metric_meta(res, metric).get("unit") or ""
        parts.append(f"<div style='display:inline-block;vertical-align:top;margin:0 12px 8px 0'>"
                     f"<p style='margin:0'><b>{escape(metric)}</b>{' (' + escape(unit) + ')' if unit else ''}: "
                     f"mean over heads per layer, 95% CI over images</p>{layer_chart_svg(res, metric)}"
                     f"<details><summary>numbers</summary>{_numbers(res, metric)}</details></div>")
    return f"<div class='probekit-results'><p>{head}</p>{''.join(parts)}</div>"
