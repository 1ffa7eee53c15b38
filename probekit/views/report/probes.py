"""The report's "What each layer knows" section: representation probes on a labelled image set.

Beside where attention looks, a labelled run with probe metrics (``knn``, ``linear_probe``;
``clusters``) says what each layer's features encode. The section holds the probes' accuracy
per layer and model (the mean of the per-image held-out correctness, with its 95% CI over images;
each model's best layer marked), chance (the majority label's share), k-means agreement (NMI, ARI)
per layer, and the group contrasts of the probe metrics, the same rows as contrasts.csv. The
numbers are computed here from the run's results; the page's script draws the chart
(accuracy against layer, a line per model, chance dotted) from them.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from probekit.results import Results
from probekit.views.plots._common import _metric
from probekit.views.plots.probes import layer_accuracy, metric_chance, probe_display, probe_metrics

__all__ = ["probe_section", "probe_html", "cluster_metrics", "CHANCE_LABEL"]

CHANCE_LABEL = "chance: the majority label's share of the images"


def cluster_metrics(results: Results) -> list[str]:
    """Labels of the clustering metrics (labels read, no table rows, ``[layers, 2]`` arrays of NMI, ARI)."""
    out = []
    for label in results.meta.get("metrics") or {}:
        m = _metric(results, label)
        if m is None or not getattr(m, "needs_labels", False) or label in results.metrics:
            continue
        arrays = [v for k, v in results.arrays.items() if k.rsplit("/", 1)[1] == label]
        if arrays and all(np.ndim(a) == 2 and np.shape(a)[1] == 2 for a in arrays):
            out.append(label)
    return out


def _num(x: Any) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def _probe_layers(results: Results, model: str) -> list[int]:
    """The layers a model's probe rows cover (the order the probes' arrays are in)."""
    probes = probe_metrics(results)
    if not probes:
        return []
    if results.source is not None:  # on disk: that model's layer column, a part at a time
        parts = results.source.filter(models=[model], metrics=[probes[0]]).iter_parts(["layer"])
        return sorted({int(v) for _, _, t in parts for v in t["layer"].unique()})
    return sorted(int(v) for v in results.rows(probes[0], models=[model])["layer"].unique())


def probe_section(results: Results, index: dict[str, int], contrasts: pd.DataFrame | None) -> dict[str, Any] | None:
    """The section's numbers (None when the run has no probe or clustering metric with labels).

    Returns:
        ``{"probes": [{"label", "display", "chance", "rows": [[model index, layer, accuracy, ci_low,
        ci_high, n, best]]}], "clusters": [{"label", "rows": [[model index, layer, nmi, ari]]}],
        "contrasts": [the contrast rows of the probe metrics]}``.
    """
    probes, clusters = probe_metrics(results), cluster_metrics(results)
    if not probes and not clusters:
        return None
    out: dict[str, Any] = {"probes": [], "clusters": [], "contrasts": [], "chance_label": CHANCE_LABEL}
    for label in probes:
        acc = layer_accuracy(results, label)
        out["probes"].append({
            "label": label, "display": probe_display(results, label),
            "chance": _num(metric_chance(results, label)),
            "rows": [[index[r.model], int(r.layer), _num(r.accuracy), _num(r.ci_low), _num(r.ci_high), int(r.n),
                      bool(r.best)] for r in acc.itertuples() if r.model in index]})
    for label in clusters:
        rows = []
        for key, arr in results.arrays.items():
            model, lab = key.rsplit("/", 1)
            if lab != label or model not in index:
                continue
            layers = _probe_layers(results, model)
            layers = layers if len(layers) == len(arr) else list(range(len(arr)))
            rows += [[index[model], layer, _num(nmi), _num(ari)] for layer, (nmi, ari) in zip(layers, arr, strict=True)]
        out["clusters"].append({"label": label, "rows": sorted(rows)})
    if contrasts is not None and len(contrasts):
        sub = contrasts[contrasts["metric"].astype(str).isin(probes)]
        out["contrasts"] = [{k: (_num(v) if isinstance(v, (float, np.floating)) else
                                 int(v) if isinstance(v, np.integer) else v) for k, v in row.items()}
                            for row in sub.to_dict("records")]
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def probe_html(section: dict[str, Any] | None, models: list[dict[str, Any]]) -> str:
    """The section's HTML: a note, the chart's place, the per-layer table (accuracy % per model and
    probe, [95% CI], best layer ★; NMI and ARI per model) and the probe metrics' contrasts."""
    if section is None:
        return ""
    names = [str(m.get("display") or m["name"]) for m in models]
    cols: list[tuple[str, str, int]] = []  # (kind, label, model index)
    cells: dict[tuple[str, str, int, int], str] = {}
    layers: set[int] = set()
    for p in section["probes"]:
        for mi, layer, acc, lo, hi, _n, best in p["rows"]:
            if ("acc", p["label"], mi) not in cols:
                cols.append(("acc", p["label"], mi))
            ci = f' <span class="ci">[{_pct(lo)}, {_pct(hi)}]</span>' if lo is not None and hi is not None else ""
            text = f"{_pct(acc)}{ci}"
            cells[("acc", p["label"], mi, layer)] = f"<b>{text} ★</b>" if best else text
            layers.add(layer)
    for c in section["clusters"]:
        for mi, layer, nmi, ari in c["rows"]:
            if ("nmi", c["label"], mi) not in cols:
                cols.append(("nmi", c["label"], mi))
            cells[("nmi", c["label"], mi, layer)] = ("–" if nmi is None else f"{nmi:.3f}") + " / " + (
                "–" if ari is None else f"{ari:.3f}")
            layers.add(layer)
    display = {p["label"]: p["display"] for p in section["probes"]}
    head = "".join(f'<th class="num">{escape(names[mi])}<br><span class="ci">'
                   f'{escape(display.get(lab, lab) + " %" if kind == "acc" else lab + ": NMI / ARI")}</span></th>'
                   for kind, lab, mi in cols)
    body = "".join("<tr><td class=\"num\">" + str(layer) + "</td>" + "".join(
        f'<td class="num">{cells.get((kind, lab, mi, layer), "")}</td>' for kind, lab, mi in cols) + "</tr>"
        for layer in sorted(layers))
    chance = "; ".join(f"{escape(p['display'])}: {_pct(p['chance'])}% (majority label)" for p in section["probes"])
    parts = [
        '<section id="probes-section"><h2>What each layer knows</h2>',
        '<p class="note">Representation probes on the labelled images: each layer\'s features (one vector per '
        'image) classify held-out images by k-NN (DINO\'s weighted vote) or a linear probe (logistic '
        'regression), and k-means clusters them against the labels (NMI, ARI: 0 for chance, 1 for the labels). '
        'Accuracy is the share of held-out images predicted right, with its 95% CI over images; ★ marks each '
        'model\'s best layer.' + (f" Chance: {chance}." if chance else "") + "</p>",
        '<div id="probes-charts" class="charts"></div>',
        f'<div class="scroll"><table id="probes-table"><thead><tr><th class="num">layer</th>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>",
    ]
    if section["contrasts"]:
        rows = "".join(
            f"<tr><td>{escape(str(r['metric']))}</td><td class=\"num\">{r['layer']}</td><td>{escape(str(r['group_a']))}"
            f"</td><td>{escape(str(r['group_b']))}</td><td class=\"num\">{_pct(r['mean_a'])}</td>"
            f"<td class=\"num\">{_pct(r['mean_b'])}</td><td class=\"num\">{_pct(r['diff'])} "
            f"<span class=\"ci\">[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]</span></td>"
            f"<td class=\"num{' sig' if r['p_holm'] is not None and r['p_holm'] < 0.05 else ''}\">"
            f"{'–' if r['p_holm'] is None else format(r['p_holm'], '.3g')}</td></tr>"
            for r in section["contrasts"])
        parts.append('<h3>Group contrasts of the probes</h3><p class="note">Difference of group accuracies (A − B, '
                     "percentage points) per layer with its 95% CI and Holm p, from the per-image held-out "
                     "correctness (contrasts.csv; the note of the contrasts section says what they infer over)."
                     '</p><div class="scroll"><table id="probes-contrasts"><thead><tr><th>metric</th>'
                     '<th class="num">layer</th><th>group A</th><th>group B</th><th class="num">A %</th>'
                     '<th class="num">B %</th><th class="num">A − B [95% CI]</th><th class="num">p (Holm)</th>'
                     f"</tr></thead><tbody>{rows}</tbody></table></div>")
    parts.append("</section>")
    return "\n".join(parts)
