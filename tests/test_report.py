"""The HTML report: explorer arrays against the model's own attention, the page's contents, the
cache, the `probekit report` command and the notebook summaries. (The browser drives it in
tests/test_report_browser.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import probekit as pk
from probekit.api import compare
from probekit.errors import ConfigError
from probekit.views import plots
from probekit.runs import explorer

pytestmark = pytest.mark.usefixtures("toy_backend")

RUN = {"name": "tiny",
       "models": [{"model": "toy:vit", "label": "toy-a", "training": "self-supervised"},
                  {"model": "toy:vit", "label": "toy-b", "training": "supervised", "options": {"depth": 3, "heads": 4}}],
       "images": {"path": "sample", "count": 5, "seed": 1}, "metrics": ["mad", "entropy"], "batch_size": 5,
       "figures": ["depth"], "report": {"showcase": 2}}


@pytest.fixture
def run_dir(tmp_path, run_file):
    return compare(run_file(RUN), out=tmp_path / "out")


def test_query_stride_fits_the_budget():
    # 16x16 grid, 12 layers x 6 heads: a query costs 72 * 256 bytes; 64 queries (stride 2) fit 1.2 MB
    assert explorer.query_stride((16, 16), 12, 6, 72 * 256 * 256) == 1
    assert explorer.query_stride((16, 16), 12, 6, 72 * 256 * 64) == 2
    assert explorer.query_stride((16, 16), 12, 6, 72 * 256 * 63) == 3


def test_explorer_rows_are_the_models_attention_quantized(toy_backend):
    torch.manual_seed(0)
    pm = pk.load("toy:vit", depth=3, heads=4, prefix=1)
    imgs = pk.resolve_images("sample", count=2, seed=1)
    got = explorer.capture(pm, imgs, budget_bytes=10**6)
    assert got["attn"].dtype == np.uint8 and got["attn"].shape == (2, 3, 4, 16, 16)  # all 16 queries fit
    _, x = imgs.dataset(pm.preprocess)[1]
    want = pm.attention(x[None])
    n = 1
    assert pm.layout(x[None]).prefix_kinds == ("cls",) and str(got["query"]) == "cls"
    for layer in range(3):
        rows = got["attn"][1, layer].astype(float) / 255 * got["attn_scale"][1, layer][..., None]
        ref = want[layer][0, :, n:, n:].numpy()
        assert np.abs(rows - ref).max() <= ref.max() / 255 * 0.51 + 1e-7
        mean_row = got["cls"][1, layer].astype(float) / 255 * got["cls_scale"][1, layer][:, None]
        cls_row = want[layer][0, :, 0, n:].numpy()
        np.testing.assert_allclose(mean_row, cls_row, atol=cls_row.max() / 255)
    from probekit.plugins.metrics.maps import rollout

    lay = pm.layout(x[None])
    roll = rollout([want[i] for i in range(3)], lay, query="cls")[-1][0].reshape(-1).numpy()
    np.testing.assert_allclose(got["rollout"][1, -1] / 255 * got["rollout_scale"][1, -1], roll, atol=roll.max() / 255)
    # no CLS token: the mean query's row (as the cls_map metric's query="mean")
    pm0 = pk.load("toy:vit", depth=2, heads=2, prefix=0)
    got0 = explorer.capture(pm0, imgs, budget_bytes=10**6)
    ref0 = pm0.attention(x[None])[1][0].numpy().mean(1)
    assert str(got0["query"]) == "mean"
    np.testing.assert_allclose(got0["cls"][1, 1] / 255 * got0["cls_scale"][1, 1][:, None], ref0, atol=ref0.max() / 255)
    # a small budget stores a sub-grid: every 2nd patch of the 4x4 grid
    sub = explorer.capture(pm, imgs, budget_bytes=3 * 4 * 16 * 4 * 2)
    assert sub["queries"].tolist() == [0, 2, 8, 10]


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
    again = compare(tmp_path / "run.yaml", out=tmp_path / "out")
    assert calls == [] and again.cached == ["toy-a", "toy-b"]
    assert {p.name: p.stat().st_mtime_ns for p in again.figures} == figs  # no figure drawn again
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


def test_notebook_summaries(run_dir):
    html = run_dir.results._repr_html_()
    assert "<table>" in html and "toy-b" in html and "mad" in html and "entropy" in html
    assert html.count("<table>") == 2
    c = run_dir._repr_html_()
    assert "report.html" in c and "Comparison" in c and html in c


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
