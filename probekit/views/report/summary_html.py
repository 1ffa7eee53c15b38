"""Compact HTML summaries for Jupyter (``Results._repr_html_``, ``Comparison._repr_html_``).

A notebook shows the per-layer means (over heads and images) per model and metric, and for a
comparison where its run directory, report and failures are: the page, not the raw table.
"""

from __future__ import annotations

from html import escape
from typing import Any

__all__ = ["results_html", "comparison_html"]

_MAX_LAYERS = 24


def _layer_tables(res: Any) -> str:
    parts = []
    for metric in res.metrics:
        means = res.layer_means(metric)
        cols = list(means.columns)[:_MAX_LAYERS]
        more = " …" if len(means.columns) > _MAX_LAYERS else ""
        unit = ((res.meta.get("metrics") or {}).get(metric) or {}).get("unit") or ""
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join(
            f"<tr><th style='text-align:left'>{escape(str(m))}</th>"
            + "".join(f"<td>{v:.4g}</td>" for v in row[cols]) + "</tr>"
            for m, row in means.iterrows())
        parts.append(f"<p><b>{escape(metric)}</b>{' (' + escape(unit) + ')' if unit else ''}: mean over heads "
                     f"and images per layer{more}</p><table><tr><th>model \\ layer</th>{head}</tr>{body}</table>")
    return "".join(parts)


def results_html(res: Any) -> str:
    """``Results`` as a header line and one small table per metric."""
    n_img = res.table["image"].nunique() if len(res) else 0
    head = (f"<b>Results</b>: {len(res)} rows, {len(res.models)} model(s) ({escape(', '.join(res.models))}), "
            f"{n_img} image(s), metrics {escape(', '.join(res.metrics))}"
            + (f", maps {escape(', '.join(sorted(res.arrays)))}" if res.arrays else ""))
    return f"<div class='probekit-results'><p>{head}</p>{_layer_tables(res) if len(res) else ''}</div>"


def comparison_html(cmp: Any) -> str:
    """A comparison: where its files are, what failed, then its results' tables."""
    items = [f"run directory <code>{escape(str(cmp.run_dir))}</code>"]
    if cmp.report is not None:
        items.append(f"report <code>{escape(str(cmp.report))}</code>")
    if cmp.cached:
        items.append(f"served from cache: {escape(', '.join(cmp.cached))}")
    fails = "".join(f"<li style='color:#b3261e'>{escape(f['model'])} ({escape(f['stage'])}): {escape(f['error'])}: "
                    f"{escape(f['message'])}</li>" for f in cmp.failures)
    return (f"<div class='probekit-comparison'><p><b>Comparison</b>: {'; '.join(items)}</p>"
            f"{'<ul>' + fails + '</ul>' if fails else ''}{results_html(cmp.results)}</div>")
