"""Figures and the report of results on disk (issue 24): drawn from aggregates read a model at a
time, they equal those drawn from the same rows in memory, and never read one metric's rows of
every model (``Results.rows``, ``ResultsScan.to_results``).

The reference is the same run directory's rows read whole (the figures' in-memory path, unchanged).
One run is real (the toy ViT of tests/_toy.py on labelled digits, three models, a probe and a clustering metric);
one dataset is synthetic, its models' rows split into parts that cut an image's heads in two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from probekit.api import compare
from probekit.results import COLUMNS, Results
from probekit.results.dataset import DatasetWriter, ResultsScan
from probekit.runs.rundir import load_run_dir, read_record
from probekit.views import plots
from probekit.views.plots.notebook import _layer_summary, results_html
from probekit.views.report.build import payload

RUN = {"name": "lazy-figures",
       "models": [{"model": "toy:vit", "label": "toy-a", "training": "self-supervised"},
                  {"model": "toy:vit", "label": "toy-b", "training": "random init",
                   "options": {"depth": 3, "heads": 4}},
                  {"model": "toy:vit", "label": "toy-c", "training": "self-supervised", "options": {"heads": 4}}],
       "images": {"kind": "digits", "count": 30, "stratify": True, "size": 32},
       "metrics": ["mad", "entropy", {"name": "knn", "options": {"folds": 2, "k": 3}},
                   {"name": "clusters", "options": {"n_init": 2}}],
       "batch_size": 16, "figures": [], "report": {"showcase": 0}}

KNN = "knn[folds=2,k=3]"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, toy_backend_module):
    cmp = compare(RUN, out=tmp_path_factory.mktemp("lazy") / "out")
    assert cmp.ok
    return cmp.run_dir


def _pair(run_dir: Path) -> tuple[Results, Results]:
    """The run's results lazily (rows on disk) and in memory (every row read)."""
    lazy, mem = load_run_dir(run_dir), load_run_dir(run_dir)
    assert len(mem.table) and mem.source is None and lazy.source is not None
    return lazy, mem


@pytest.fixture
def no_rows(monkeypatch):
    """While on: reading one metric's rows of a lazy Results, or materialising a scan, raises."""
    real_rows = Results.rows

    def rows(self, metric=None, models=None):
        if self.source is not None:
            raise AssertionError(f"Results.rows({metric!r}, {models!r}) of results on disk")
        return real_rows(self, metric, models)

    def to_results(self):
        raise AssertionError("ResultsScan.to_results")

    def on():
        monkeypatch.setattr(Results, "rows", rows)
        monkeypatch.setattr(ResultsScan, "to_results", to_results)

    return on


def _drawn(fig) -> list:
    """What a figure draws, axes by axes: lines' x/y data and labels, collections' offsets, path
    vertices (CI bands, error bars) and colour arrays (heatmaps), tick labels, texts and titles."""
    out: list = []
    for a in fig.axes:
        out.append(("title", a.get_title(), a.get_xlabel(), a.get_ylabel()))
        out.append(("ticks", [t.get_text() for t in a.get_xticklabels()], [t.get_text() for t in a.get_yticklabels()]))
        for line in a.get_lines():
            out.append(("line", line.get_label(), np.asarray(line.get_xydata(), dtype=float)))
        for c in a.collections:
            out.append(("offsets", np.asarray(c.get_offsets(), dtype=float)))
            out += [("path", np.asarray(p.vertices, dtype=float)) for p in c.get_paths()]
            arr = c.get_array()
            if arr is not None:
                out.append(("array", np.ma.filled(np.asarray(arr, dtype=float), np.nan)))
        out += [("text", t.get_text(), np.asarray(t.get_position(), dtype=float)) for t in a.texts]
    return out


def _assert_same(got, want, path="") -> None:
    assert type(got) is type(want), path
    if isinstance(got, np.ndarray):
        assert got.shape == want.shape, path
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=path)
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]")
    elif isinstance(got, dict):
        assert got.keys() == want.keys(), path
        for k in got:
            _assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(got, float) and np.isfinite(want):
        assert got == pytest.approx(want, rel=1e-12, abs=0), path
    else:
        assert got == want or (got != got and want != want), path


FIGURES = [("depth", "mad"), ("heatmap", "mad"), ("overlay", "mad"), ("summary", "mad"), ("labels", "mad"),
           ("overlay", "entropy"), ("summary", "entropy"), ("labels", "entropy"), ("accuracy", KNN)]


@pytest.mark.parametrize(("kind", "metric"), FIGURES)
def test_each_figure_of_a_run_on_disk_equals_the_one_of_its_rows_in_memory(run_dir, no_rows, kind, metric):
    import matplotlib.pyplot as plt

    lazy, mem = _pair(run_dir)
    want_fig = plots.plot(mem, kind, metric)
    no_rows()
    with pytest.raises(AssertionError, match="of results on disk"):  # the guard is on
        lazy.rows(metric)
    got_fig = plots.plot(lazy, kind, metric)
    try:
        want, got = _drawn(want_fig), _drawn(got_fig)
        assert sum(1 for d in want if d[0] in ("line", "offsets", "array")) >= 3  # something was drawn
        _assert_same(got, want)
    finally:
        plt.close(want_fig)
        plt.close(got_fig)
    assert lazy.source is not None  # the rows were never read whole


def test_a_subset_of_models_draws_the_same_on_disk_and_in_memory(run_dir, no_rows):
    import matplotlib.pyplot as plt

    lazy, mem = _pair(run_dir)
    kinds = [("depth", {}), ("heatmap", {}), ("overlay", {}), ("labels", {}), ("summary", {"layers": [0, 2]})]
    want = [plots.plot(mem, k, "mad", models=["toy-c", "toy-b"], **o) for k, o in kinds]
    no_rows()
    got = [plots.plot(lazy, k, "mad", models=["toy-c", "toy-b"], **o) for k, o in kinds]
    try:
        for g, w in zip(got, want, strict=True):
            _assert_same(_drawn(g), _drawn(w))
        assert [t.get_text() for t in got[-1].axes[0].get_xticklabels()] == ["toy-b", "toy-c"]
    finally:
        for f in got + want:
            plt.close(f)


def test_the_report_and_notebook_of_a_run_on_disk_equal_those_of_its_rows_in_memory(run_dir, no_rows):
    lazy, mem = _pair(run_dir)
    record = read_record(run_dir)
    want, _ = payload(run_dir, record, mem, None)
    want_html = results_html(mem)
    want_layers = {m: _layer_summary(mem, m) for m in mem.metrics}
    no_rows()
    got, _ = payload(run_dir, record, lazy, None)
    for key in ("created",):
        got.pop(key), want.pop(key)
    assert got["labels"]["mad"]["names"] and got["probes"]["probes"][0]["label"] == KNN
    assert len(got["probes"]["clusters"][0]["rows"]) == 2 + 3 + 2  # a row per model and layer
    assert len(got["layers"]["mad"]) == 2 + 3 + 2  # toy-a, toy-c: 2 layers; toy-b: 3
    _assert_same(got, want)
    for m in lazy.metrics:
        g, w = _layer_summary(lazy, m), want_layers[m]
        assert list(g["model"].astype(str)) == list(w["model"].astype(str))
        for col in ("layer", "n", "n_nonfinite"):
            assert g[col].tolist() == w[col].tolist()
        for col in ("mean", "std", "ci_low", "ci_high"):
            np.testing.assert_allclose(g[col].to_numpy(float), w[col].to_numpy(float), rtol=1e-12)
    assert results_html(lazy) == want_html  # (numbers printed to 4 significant digits)


def test_render_all_of_a_run_on_disk_draws_every_figure_and_keeps_them_on_a_second_call(run_dir, no_rows,
                                                                                     tmp_path):
    lazy, mem = _pair(run_dir)
    want = [p.name for p in plots.render_all(mem, tmp_path / "mem", kinds=["depth", "labels", "accuracy"])]
    no_rows()
    got = plots.render_all(lazy, tmp_path / "lazy", kinds=["depth", "labels", "accuracy"])
    assert [p.name for p in got] == want and "accuracy_knn_folds=2_k=3.png" in want and "labels_mad.png" in want
    stamps = (tmp_path / "lazy" / ".stamps.json").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in got}
    again = plots.render_all(lazy, tmp_path / "lazy", kinds=["depth", "labels", "accuracy"])
    assert {p.name: p.stat().st_mtime_ns for p in again} == before  # same parts: nothing drawn again
    assert (tmp_path / "lazy" / ".stamps.json").read_text() == stamps
    assert plots.figure_notes(lazy, ["depth", "labels", "accuracy", "overlay"]) == \
        plots.figure_notes(mem, ["depth", "labels", "accuracy", "overlay"])


def _split_dataset(tmp_path: Path) -> Path:
    """A synthetic labelled table (a per-head and a per-image metric, a NaN), each model x metric
    written as three parts of unequal size: an image's heads fall in two parts."""
    rng = np.random.default_rng(3)
    rows = [(m, f"img{i:02d}", layer, head, metric, float(rng.normal(layer * (1 + k), 1.0 + head)))
            for k, m in enumerate(["z/last", "a first", "mid"]) for metric in ("mad", "entropy")
            for i in range(13) for layer in range(4 - k % 2) for head in ((-1,) if metric == "entropy" else (0, 1, 2))]
    t = pd.DataFrame(rows, columns=COLUMNS)
    t.loc[7, "value"] = np.nan
    t["label"] = t["image"].map(lambda n: ("cat", "dog", "eel")[int(n[3:]) % 3 if int(n[3:]) < 10 else 0])
    t = Results(t).table
    w = DatasetWriter(tmp_path / "results.parquet")
    for (model, metric), g in t.groupby(["model", "metric"], observed=True, sort=False):
        for s, cut in enumerate(np.split(np.arange(len(g)), [len(g) // 3 + 1, 2 * len(g) // 3 - 1])):
            w.write(g.iloc[cut], str(model), str(metric), s)
    w.commit({"models": {"z/last": {"training": "supervised"}, "a first": {"training": "self-supervised"}}})
    return tmp_path / "results.parquet"


def test_figures_of_parts_that_split_an_image_equal_those_in_memory(tmp_path, no_rows):
    import matplotlib.pyplot as plt

    root = _split_dataset(tmp_path)
    scan = ResultsScan(root)
    assert len(scan.filter(models=["mid"], metrics=["mad"]).parts()) == 3
    mem = Results.read_parquet(root)
    lazy = Results._lazy(scan, meta=scan.meta)
    kinds = [("depth", "mad"), ("heatmap", "mad"), ("overlay", "mad"), ("summary", "mad"), ("labels", "mad"),
             ("overlay", "entropy"), ("summary", "entropy"), ("labels", "entropy")]
    want = [plots.plot(mem, k, m) for k, m in kinds]
    no_rows()
    got = [plots.plot(lazy, k, m) for k, m in kinds]
    try:
        for (k, m), g, w in zip(kinds, got, want, strict=True):
            _assert_same(_drawn(g), _drawn(w), f"{k}_{m}")
    finally:
        for f in got + want:
            plt.close(f)


def test_a_changed_part_redraws_only_the_figures_of_its_metric(tmp_path, no_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _split_dataset(tmp_path)
    scan = ResultsScan(root)
    lazy = Results._lazy(scan, meta=scan.meta)
    no_rows()
    kinds = ["depth", "overlay"]
    first = {p.name: p.stat().st_mtime_ns for p in plots.render_all(lazy, tmp_path / "fig", kinds=kinds)}
    assert sorted(first) == ["depth_mad.png", "depth_mad.svg", "overlay_entropy.png", "overlay_entropy.svg",
                             "overlay_mad.png", "overlay_mad.svg"]
    part = root / scan.filter(models=["mid"], metrics=["mad"]).parts()[1].path
    t = pq.read_table(part)
    pq.write_table(t.set_column(t.column_names.index("value"), "value", pa.array(t["value"].to_numpy() + 1.0)), part)
    again = {p.name: p.stat().st_mtime_ns for p in plots.render_all(lazy, tmp_path / "fig", kinds=kinds)}
    assert {n for n in again if again[n] != first[n]} == {"depth_mad.png", "depth_mad.svg", "overlay_mad.png",
                                                         "overlay_mad.svg"}
