"""``report.html``: one self-contained file built from a run directory.

Everything the page needs is inside it: the JSON of the numbers (per-head and per-layer
summaries with CIs, contrasts, provenance), the explorer's uint8 arrays (deflate-compressed,
base64) and the JPEG backgrounds as data URIs, the script and the style. A Content-Security-Policy
forbids every network request, so the file opens from ``file://`` or a mail attachment as is.
"""

from __future__ import annotations

import base64
import json
import zlib
from datetime import datetime, timezone
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probekit._io.atomic import write_text_atomic
from probekit.inputs.view import is_view
from probekit.results import Results, summarize
from probekit.runs.record import MetricRecord, ModelRecord, RunRecord
from probekit.views.plots._common import LABEL_COLOURS, display_name
from probekit.views.plots.aggregates import image_labels, image_means, metric_models
from probekit.views.plots.labels import MAX_LABELS
from probekit.views.plots.probes import is_probe, metric_chance
from probekit.views.report.findings import findings
from probekit.views.report.probes import CHANCE_LABEL, probe_html, probe_section
from probekit.views.report.shareable import shareable

__all__ = ["write_report", "build_html", "payload", "script_json", "record_groups"]

_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
        "connect-src data: blob:")


def _asset(name: str) -> str:
    return (resources.files("probekit.views.report") / "assets" / name).read_text(encoding="utf-8")


def _num(x: Any) -> Any:
    """JSON-safe number (NaN -> None)."""
    if x is None:
        return None
    x = float(x)
    return None if not np.isfinite(x) else float(f"{x:.7g}")  # 7 significant digits: small values keep theirs


def record_groups(record: RunRecord, models: list[str], by: str = "training") -> dict[str, str]:
    """``{model: group}`` from the run's model records (``training``, or the tag named ``by``)."""
    from probekit.views.contrasts import model_groups

    return model_groups({"models": {m.label: m.model_dump() for m in record.models}}, models, by)


def _metric_info(label: str, rec: MetricRecord | None, results: Results, models: list[str]) -> dict[str, Any]:
    """Display name, unit and reference line of a metric, from the metric itself (plugins too)."""
    from probekit.views.plots._common import _metric, _reference

    name, opts = (rec.name, rec.options) if rec is not None else (label, {})
    m = _metric(results, label)  # None when its plugin is not installed here: drawn under its label
    display = getattr(m, "display_name", None) or name
    unit = (rec.unit if rec is not None else None) or (m.unit if m is not None else "")
    refs = {}
    for model in models:
        try:
            refs[model] = _num(_reference(results, model, label))
        except Exception:  # a reference that cannot be computed for this layout is left out
            refs[model] = None
    info = {"label": label, "name": name, "options": opts, "unit": unit, "display": display, "refs": refs,
            "ref_label": "the value of uniform attention", "ref_key": "uniform attention (no locality)",
            "ref_name": "uniform attention", "axis": f"{label} ({unit})" if unit else label}
    if "label" in results.columns and is_probe(results, label):  # accuracy: the reference is chance
        chance = _num(metric_chance(results, label))
        info.update(refs={model: chance for model in models}, ref_label=CHANCE_LABEL, ref_key="chance (majority label)",
                    ref_name="chance (the majority label)")
    return info


def _explorer(run_dir: Path, record: RunRecord, model_index: dict[str, int]) -> tuple[dict | None, bytes]:
    """The explorer's JSON and its uint8 blob (:mod:`probekit.views.report.explorer`)."""
    from probekit.views.report.explorer import explorer_payload

    return explorer_payload(run_dir, record, model_index)


def payload(run_dir: Path, record: RunRecord, results: Results,
            contrasts: pd.DataFrame | None) -> tuple[dict[str, Any], bytes]:
    """Everything the page draws, as JSON, and the explorer's binary blob."""
    from probekit.views.contrasts import contrast_note

    # models with table rows, then those with map arrays only (a run of map metrics has no rows)
    names = list(dict.fromkeys([*results.models, *(k.rsplit("/", 1)[0] for k in results.arrays)]))
    index = {m: i for i, m in enumerate(names)}
    by = record.report.group_by if record.report is not None else "training"
    groups = record_groups(record, names, by)
    mrecs = {m.label: m for m in record.models}
    models = [_model_row(m, groups[m], mrecs.get(m), results) for m in names]
    summ = results.summary()
    heads, layers, metrics, by_label = {}, {}, [], {}
    for k, label in enumerate(results.metrics):
        info = _metric_info(label, record.metrics.get(label), results, names)
        info["id"] = k
        metrics.append(info)
        s = summ[(summ["metric"].astype(str) == label) & (summ["head"] >= 0)]
        heads[label] = [[index[str(r.model)], int(r.layer), int(r.head), _num(r.mean), int(r.n), _num(r.ci_low),
                         _num(r.ci_high)] for r in s.itertuples()]
        ls = _layer_summary(results, label)
        layers[label] = [[index[str(r.model)], int(r.layer), _num(r.mean), _num(r.ci_low), _num(r.ci_high), int(r.n)]
                         for r in ls.itertuples()]
        if "label" in results.columns:
            by_label[label] = _label_layers(results.rows(label), label, index) if results.source is None else \
                _lazy_label_layers(results, label, index)
    explorer, blob = _explorer(run_dir, record, index)
    notes = list(record.report_notes or [])
    empty = None  # what the per-metric, summary and contrast sections say when no metric has per-image values
    if not metrics:
        maps = ", ".join(dict.fromkeys(k.rsplit("/", 1)[1] for k in results.arrays if not is_view(k)))
        empty = (f"No per-image values to chart, tabulate or contrast: this run's metrics ({maps or 'none'}) give "
                 "arrays (per-image maps are drawn in figures/maps_*.png and in the attention explorer below).")
        notes.append(empty)
    frames = record.images.notes  # (name, note): multi-frame images
    if frames:
        shown = ", ".join(str(n) for n, _ in frames[:10]) + (", ..." if len(frames) > 10 else "")
        notes.append(f"{len(frames)} multi-frame image(s) (animated GIF, multi-page TIFF) were probed at their "
                     f"first frame only: {shown}.")
    if explorer is None and not (record.report is not None and record.report.showcase):
        notes.append("No attention explorer: the run stored no showcase images (report.showcase: 0 or --no-report).")
    crow = [] if contrasts is None else [{k: (_num(v) if isinstance(v, (float, np.floating)) else
                                              (int(v) if isinstance(v, (np.integer,)) else v))
                                          for k, v in row.items()} for row in contrasts.to_dict("records")]
    floor = contrast_note(contrasts) if contrasts is not None else ""  # the rows' question and p floors
    images = record.images
    prov = {"name": record.name, "status": record.status, "started": record.started, "finished": record.finished,
            "seconds": record.seconds, "versions": record.versions, "config": record.config,
            "images": {"count": images.count, "fingerprint": images.fingerprint, "skipped": images.skipped,
                       "notes": images.notes},
            "failures": [{"model": f.model, "stage": f.stage, "error": f.error, "message": f.message}
                         for f in record.failures],
            "notes": notes}
    title = record.name if record.name is not None else run_dir.name
    if any(str(m.get("spec") or "").startswith("onnx:") for m in models) and \
            len({m["parameters"] for m in models if m.get("parameters")}) > 1:
        notes.append("Parameters are each library's own count. An ONNX graph counts every weight it stores: "
                     "heads it carries beside the encoder and position embeddings at its native grid, so the "
                     "same encoder can count more there than in timm or transformers at this image size.")
    data = {"title": f"probekit report: {title}", "models": models,
            "groups": list(dict.fromkeys(groups[m] for m in names)), "group_by": by, "metrics": metrics,
            "heads": heads, "layers": layers, "labels": by_label, "label_colours": list(LABEL_COLOURS),
            "findings": findings(metrics, models, layers, contrasts, by),
            "contrasts": crow, "contrast_note": floor, "provenance": prov,
            "explorer": explorer, "empty_note": empty, "probes": probe_section(results, index, contrasts),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return shareable(data, run_dir), blob  # a page meant to be shared: no local path in it


def _layer_summary(results: Results, metric: str) -> pd.DataFrame:
    """Per model and layer, the mean over images (and heads) with its 95% CI, of the per-image values
    that contrasts take (:func:`~probekit.views.contrasts.image_layer_means`); of results on disk, a
    model at a time (its parts one after the other), so one metric's values of every model never
    sit in memory together."""
    from probekit.views.contrasts import image_layer_means

    if results.source is None:
        per = image_layer_means(results, metric).rename("value").reset_index()
        return summarize(per.assign(metric=metric, head=-1), by=("model", "layer"))
    pieces = []
    for model in metric_models(results, metric):
        per = results.source.filter(models=[model]).per_image_layer(metric).rename("value").reset_index()
        pieces.append(summarize(per.assign(metric=metric, head=-1), by=("model", "layer")))
    if not pieces:
        return summarize(pd.DataFrame({"model": [], "layer": [], "value": []}), by=("model", "layer"))
    return pd.concat(pieces, ignore_index=True).sort_values(["model", "layer"], kind="stable").reset_index(drop=True)


def _lazy_label_layers(results: Results, metric: str, index: dict[str, int]) -> dict[str, Any]:
    """:func:`_label_layers` of results on disk: the images' labels read part by part, then each model's
    per-image means over heads (with their labels), summarised and dropped."""
    counts = image_labels(results, metric).value_counts()
    top = list(counts.index[:MAX_LABELS])
    pieces = []
    for model in metric_models(results, metric):
        per = image_means(results, metric, model, label=True)
        per = per[per["label"].isin(top)]
        pieces.append(summarize(per.assign(model=model, metric=metric, head=-1), by=("model", "label", "layer")))
    s = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=["model", "label", "layer"])
    return _label_rows(s, counts, top, index)


def _label_layers(table: pd.DataFrame, metric: str, index: dict[str, int]) -> dict[str, Any]:
    """Per-label rows of one metric: ``names`` (the most frequent :data:`MAX_LABELS` labels, with their
    image counts) and ``rows`` ``[model index, label index, layer, mean, ci_low, ci_high, n]``, the
    mean over heads and that label's images with its 95% CI over them."""
    t = table[table["metric"].astype(str) == metric]
    counts = t.drop_duplicates(["image"])["label"].astype(str).value_counts()
    top = list(counts.index[:MAX_LABELS])
    t = t[t["label"].astype(str).isin(top)]
    per = t.groupby(["model", "label", "image", "layer"], observed=True)["value"].mean().reset_index()
    s = summarize(per.assign(metric=metric, head=-1, label=per["label"].astype(str)), by=("model", "label", "layer"))
    return _label_rows(s, counts, top, index)


def _label_rows(s: pd.DataFrame, counts: pd.Series, top: list[str], index: dict[str, int]) -> dict[str, Any]:
    """The report's ``names``, ``more`` and ``rows`` of a per-label summary ``s`` (see :func:`_label_layers`)."""
    pos = {lab: i for i, lab in enumerate(top)}
    return {"names": [[lab, int(counts[lab])] for lab in top], "more": max(0, len(counts) - len(top)),
            "rows": [[index[str(r.model)], pos[str(r.label)], int(r.layer), _num(r.mean), _num(r.ci_low),
                      _num(r.ci_high), int(r.n)] for r in s.itertuples()]}


# inside a <script> element the HTML parser looks for "</script" and, after "<!--", for "<script" (which
# then hides the real end tag): no "<" may appear there. JSON allows \uXXXX for any character in a
# string, and <, >, & and U+2028/2029 occur in JSON only inside strings, so escaping them keeps the data.
_JSON_IN_HTML = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                               "\u2029": "\\u2029"})


def script_json(data: Any) -> str:
    r"""``data`` as JSON that is safe as the text of a ``<script>`` element, whatever its strings hold.

    >>> print(script_json({"name": "<!--<script>"}))
    {"name": "\u003c!--\u003cscript\u003e"}
    """
    return json.dumps(data, default=str, allow_nan=False).translate(_JSON_IN_HTML)


def build_html(data: dict, blob: bytes) -> str:
    """The page: style, data, compressed blob and script inline."""
    js_json = script_json(data)
    b64 = base64.b64encode(zlib.compress(blob, 6)).decode() if blob else ""
    metric_sections = "\n".join(
        f'<section class="metric" id="metric-{m["id"]}"><h2>{escape(m["label"])}: {escape(str(m["display"]))}'
        f'{" (" + escape(m["unit"]) + ")" if m["unit"] else ""}</h2></section>' for m in data["metrics"]) or (
        f'<section class="metric" id="metric-none"><h2>Metrics</h2><p class="note">{escape(data["empty_note"])}</p>'
        '</section>' if data.get("empty_note") else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(data["title"])}</title>
<style>{_asset("report.css")}{_asset("explorer.css")}</style></head>
<body>
<header><h1>{escape(data["title"])}</h1><p class="subtitle">{escape(_subtitle(data))}</p>
<div class="controls" id="controls"></div></header>
<main>
<section id="findings"><h2>Findings</h2><div id="findings-body" class="findings"></div></section>
{probe_html(data.get("probes"), data["models"])}
{metric_sections}
<section id="contrasts-section"><h2>Group contrasts</h2>
<p class="note">Per metric and layer: difference of group means (A − B) of the per-image values (mean over heads),
its 95% CI, a p-value Holm-corrected across layers and an effect size, all answering the question the note
below states (inference over images for these models, or over models as a sample). Also in
contrasts.csv.</p><div id="contrasts-table"></div></section>
<section id="summary-section"><h2>Summary table</h2><p class="note">Mean over heads and images per layer, 95% CI over
images, for the metric chosen. Click a header to sort.</p><div id="summary-table"></div></section>
<section id="explorer"><h2>Attention explorer</h2><div id="explorer-body"></div></section>
<section id="provenance"><h2>Provenance</h2></section>
</main>
<div id="tip"></div>
<script type="application/json" id="data">{js_json}</script>
<script type="application/octet-stream" id="blob">{b64}</script>
<script>{_asset("report.js")}
{_asset("explorer.js")}</script>
</body></html>
"""


def _subtitle(data: dict) -> str:
    """One line under the title: what was compared, on what, and whether the run finished."""
    P = data["provenance"]
    n = len(data["models"])
    return (f"{n} model{'s' if n != 1 else ''} in {len(data['groups'])} {data['group_by']} group"
            f"{'s' if len(data['groups']) != 1 else ''} · {P['images']['count']} images · "
            f"metrics: {', '.join(m['label'] for m in data['metrics']) or 'maps only'} · run {P['status']}"
            + (f", finished {P['finished']}" if P.get("finished") else ""))


def _model_row(name: str, group: str, r: ModelRecord | None, results: Results) -> dict[str, Any]:
    """A model as the page lists it (``r``: its record in run.json, if any)."""
    lay = (r.layout if r is not None else None) or ((results.meta.get("models") or {}).get(name) or {}).get("layout")
    weights = r.weights if r is not None else None
    computed = (r.computed or {}) if r is not None else {}
    earlier = [v for v in computed.values() if isinstance(v, dict)]  # what the runs that computed its parts took
    probe_s = r.probe_s if r is not None else None
    load_s = r.load_s if r is not None else None
    return {
        "name": name, "group": group, "display": display_name(name, group),
        "training": r.training if r is not None else None,
        "spec": r.spec if r is not None else None,
        "weights": "; ".join(f"{k}: {v}" for k, v in weights.items()) if isinstance(weights, dict) else weights,
        "layout": (f"{lay['num_prefix']} prefix, grid {lay['grid'][0]}x{lay['grid'][1]}, "
                   f"patch {lay['patch_size'][0]}x{lay['patch_size'][1]}") if lay else None,
        "parameters": r.parameters if r is not None else None, "load_s": load_s, "probe_s": probe_s,
        # a model served from the cache: the load and probe seconds of the run that computed its parts
        "load_s_cached": None if load_s is not None else _first(v.get("load_s") for v in earlier),
        "probe_s_cached": None if probe_s is not None else _first(v.get("seconds") for v in earlier),
        "cached": ", ".join(r.cached if r is not None else []) or "no",
    }


def _first(values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def write_report(run_dir: str | Path, record: RunRecord, results: Results, contrasts: pd.DataFrame | None,
                 path: str | Path | None = None) -> Path:
    """Write the page for a run directory's record, results and contrasts; returns its path.

    Args:
        path: where (default ``run_dir/report.html``).
    """
    run_dir = Path(run_dir)
    data, blob = payload(run_dir, record, results, contrasts)
    return write_text_atomic(Path(path) if path else run_dir / "report.html", build_html(data, blob))
