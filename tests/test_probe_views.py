"""The views of representation probes on a labelled run (issue 23): the accuracy-per-layer figure
(lines and CI bands from the summaries, chance at the majority label's share, the best layer
ringed) and the report's "What each layer knows" section (per-layer accuracy with the best layer
marked, k-means NMI/ARI from the run's arrays, the probes' group contrasts from contrasts.csv),
on scikit-learn's digits through two tiny random-init toy models."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import probekit as pk
from probekit.api import compare
from probekit.errors import ConfigError
from probekit.results import summarize
from probekit.views import plots
from probekit.views.plots.probes import chance_level, layer_accuracy, probe_accuracy

RUN = {"name": "tiny-probes",
       "models": [{"model": "toy:vit", "label": "toy-a", "training": "self-supervised"},
                  {"model": "toy:vit", "label": "toy-b", "training": "random init",
                   "options": {"depth": 3, "heads": 4}}],
       # 55 digits: 5 or 6 per class (5-fold cross-validation needs 5); labels not all equally frequent
       "images": {"kind": "digits", "count": 55, "stratify": True, "size": 32},
       "metrics": ["knn", {"name": "linear_probe", "options": {"cs": [1.0]}}, "clusters"],
       "batch_size": 28, "figures": ["accuracy", "overlay"], "report": {"showcase": 0}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_backend_module):
    return compare(RUN, out=tmp_path_factory.mktemp("probes") / "out")


def _plain_accuracy(table: pd.DataFrame, metric: str) -> pd.Series:
    """Per model and layer, the share of images right (plain pandas on the long table)."""
    t = table[table["metric"].astype(str) == metric]
    return t.groupby([t["model"].astype(str), "layer"])["value"].mean()


def test_accuracy_figure_draws_the_summaries_chance_and_best_layer(run):
    res = run.results
    names = sorted(p.name for p in run.figures)
    assert "accuracy_knn.png" in names and not any(n.startswith("overlay_") for n in names)
    notes = json.loads((run.run_dir / "run.json").read_text())["notes"]
    assert any("No overlay figure" in n and "accuracy figures" in n for n in notes)
    counts = res.table.drop_duplicates("image")["label"].value_counts()
    assert counts.max() == 6 and chance_level(res.table, "knn") == pytest.approx(6 / 55)
    plain = _plain_accuracy(res.table, "knn")
    fig, ax = probe_accuracy(res, "knn")
    assert ax.chance == pytest.approx(6 / 55)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert {"toy-a (self-supervised)", "toy-b (random init)"} <= set(lines)
    for model, label in (("toy-a", "toy-a (self-supervised)"), ("toy-b", "toy-b (random init)")):
        x, y = lines[label].get_data()
        np.testing.assert_allclose(y, plain[model].loc[list(x)].to_numpy(), rtol=1e-9)
    # the bands are the summaries' 95% CIs over images
    per = res.table[res.table["metric"] == "knn"].groupby(["model", "image", "layer"], observed=True)["value"]
    s = summarize(per.mean().reset_index().assign(metric="knn", head=-1))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # toy-a's band (first drawn)
    lo = s[s["model"].astype(str) == "toy-a"].sort_values("layer")["ci_low"].to_numpy()
    assert np.isin(np.round(lo, 9), np.round(band, 9)).all()
    # one ring per model, at its most accurate layer
    rings = [c for c in ax.collections if len(c.get_offsets()) == 1]
    best = {tuple(np.round(c.get_offsets()[0], 9)) for c in rings}
    want = {(float(plain[m].idxmax()), round(float(plain[m].max()), 9)) for m in ("toy-a", "toy-b")}
    assert want <= best
    with pytest.raises(ConfigError, match="not a probe metric"):
        probe_accuracy(res, "clusters")


def test_layer_accuracy_marks_the_first_best_layer():
    rows = [("m", f"i{i}", layer, -1, "knn", float(v), "a" if i < 3 else "b")
            for layer, vals in enumerate([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]]) for i, v in enumerate(vals)]
    t = pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value", "label"])
    acc = layer_accuracy(pk.Results(t), "knn")
    assert acc["accuracy"].tolist() == [0.25, 0.5, 0.5] and acc["best"].tolist() == [False, True, False]
    assert chance_level(t) == 0.75


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def test_report_section_holds_accuracy_clusters_and_contrasts(run):
    page = run.report.read_text()
    assert "<h2>What each layer knows</h2>" in page
    data = _data(page)
    section = data["probes"]
    models = [m["name"] for m in data["models"]]
    res = run.results
    plain = _plain_accuracy(res.table, "knn")
    knn = next(p for p in section["probes"] if p["label"] == "knn")
    assert knn["display"] == "k-NN accuracy" and knn["chance"] == pytest.approx(6 / 55)
    for mi, layer, acc, lo, hi, n, best in knn["rows"]:
        model = models[mi]
        assert acc == pytest.approx(plain[(model, layer)], rel=1e-5) and lo <= acc <= hi and n == 55
        assert best == (layer == int(plain[model].idxmax()))
    # the chart's reference is chance, named so
    metric = next(m for m in data["metrics"] if m["label"] == "knn")
    assert list(metric["refs"].values()) == [pytest.approx(6 / 55)] * 2
    assert metric["ref_key"] == "chance (majority label)"
    # the table: best layers starred, one per model and probe
    table = re.search(r'<table id="probes-table">.*?</table>', page, re.S).group(0)
    assert table.count("★") == 2 * 2
    # k-means NMI / ARI are the run's arrays, layer by layer
    clusters = next(c for c in section["clusters"] if c["label"] == "clusters")
    for model in models:
        arr = res.arrays[f"{model}/clusters"]
        got = [r for r in clusters["rows"] if models[r[0]] == model]
        assert [r[1] for r in got] == list(range(len(arr)))
        np.testing.assert_allclose([[r[2], r[3]] for r in got], arr, rtol=1e-5)
        assert f"{arr[0, 0]:.3f} / {arr[0, 1]:.3f}" in table
    # the probes' contrasts are contrasts.csv's rows of those metrics
    csv = pd.read_csv(run.run_dir / "contrasts.csv")
    mine = csv[csv["metric"] == "knn"].sort_values("layer")
    got = [r for r in section["contrasts"] if r["metric"] == "knn"]
    assert [r["layer"] for r in got] == mine["layer"].tolist() == [0, 1]  # the layers both models have
    np.testing.assert_allclose([r["diff"] for r in got], mine["diff"], rtol=1e-5)
    assert 'id="probes-contrasts"' in page


def test_a_run_without_probes_has_no_section():
    from probekit.views.report.probes import probe_html, probe_section

    rows = [("m", f"i{i}", 0, 0, "mad", 1.0, "a") for i in range(3)]
    res = pk.Results(pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value", "label"]))
    assert probe_section(res, {"m": 0}, None) is None and probe_html(None, []) == ""
    assert plots.figure_notes(res, ["accuracy"]) == [
        "No accuracy figure: it draws a probe metric's per-image accuracy (knn, linear_probe) on labelled images, "
        "and none of this run's metrics (mad) has any."]
