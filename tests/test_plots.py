"""Figures: drawn from a parquet file alone, written as non-empty PNG and SVG, with the
uniform-attention reference line of the depth profile at its closed form."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import probekit as pk
from probekit.views import plots
from probekit.api import compare
from probekit.errors import ProbekitError
from probekit.results import Results

MAD_META = {"name": "mad", "options": {"renormalize": False, "units": "px"}, "unit": "px"}


def _results(layouts=None) -> Results:
    """Two models (different depth, heads and layout), 5 images, MAD per head, and a map."""
    rng = np.random.default_rng(0)
    layouts = layouts or {
        "deit-s": {"num_prefix": 1, "grid": [14, 14], "patch_size": [16, 16]},
        "dinov2-s14": {"num_prefix": 5, "grid": [16, 16], "patch_size": [14, 14]},
    }
    shape = {"deit-s": (4, 3), "dinov2-s14": (3, 2)}
    rows = []
    for model, (layers, heads) in shape.items():
        for img in range(5):
            for layer in range(layers):
                for head in range(heads):
                    rows.append((model, f"img{img}.jpg", layer, head, "mad", 30 + 20 * layer + rng.normal(0, 5)))
    meta = {
        "metrics": {"mad": MAD_META},
        "models": {m: {"layout": layouts[m], "training": t} for m, t in
                   zip(shape, ("supervised", "self-supervised"))},
        "images": {"names": [f"img{i}.jpg" for i in range(5)]},
    }
    arrays = {"deit-s/cls_map": rng.random((5, 4, 3, 14, 14)).astype(np.float32)}
    return Results(pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value"]), arrays, meta)


def _dashed(ax):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]


def test_uniform_reference_is_the_closed_form():
    # 14 x 14 grid, 16 px patches: the paper's "global" level, 116.49 px with no prefix token
    lay = pk.TokenLayout(num_prefix=1, grid=(14, 14), patch_size=(16, 16))
    mean_pair = lay.pixel_distances(dtype=torch.float64).mean().item()
    assert mean_pair == pytest.approx(116.4922, abs=1e-4)
    assert plots.uniform_attention_value(lay) == pytest.approx(mean_pair * 196 / 197, rel=1e-12)
    assert plots.uniform_attention_value(lay, renormalize=True) == pytest.approx(mean_pair, rel=1e-12)
    # and it is what the MAD metric itself gives for uniform attention over all 197 tokens,
    # on a rectangular grid with non-square patches and registers too
    mad = pk.metrics.get("mad")
    for layout in (lay, pk.TokenLayout(num_prefix=5, grid=(6, 9), patch_size=(14, 10))):
        t = layout.num_tokens
        uniform = torch.full((1, 1, t, t), 1.0 / t, dtype=torch.float64)
        for opts in ({}, {"renormalize": True}, {"units": "patch"}, {"units": "fraction"}):
            got = mad(**opts).compute(uniform, layout).item()
            assert plots.uniform_attention_value(layout, **opts) == pytest.approx(got, rel=1e-5), (layout, opts)


def test_depth_profile_draws_a_dot_per_head_and_the_reference_line():
    res = _results()
    fig, axes = plots.depth_profile(res)
    assert len(axes) == 2
    deit, dino = axes
    # one dot per (layer, head), at the mean over images
    offsets = deit.collections[0].get_offsets()
    assert len(offsets) == 4 * 3
    t = res.table[(res.table.model == "deit-s") & (res.table.layer == 2) & (res.table["head"] == 1)]
    hit = (offsets[:, 0] == 2) & np.isclose(offsets[:, 1], t["value"].mean(), rtol=1e-12)
    assert hit.sum() == 1
    # dashed line at uniform attention for each model's own layout
    (line,) = _dashed(deit)
    assert line.get_ydata()[0] == pytest.approx(116.492227 * 196 / 197, rel=1e-8)
    (line,) = _dashed(dino)
    lay = pk.TokenLayout(num_prefix=5, grid=(16, 16), patch_size=(14, 14))
    expected = lay.pixel_distances(dtype=torch.float64).mean().item() * 256 / 261
    assert line.get_ydata()[0] == pytest.approx(expected, rel=1e-9)
    assert deit.get_ylabel() == "mean attention distance (px)"
    assert deit.get_shared_y_axes().joined(deit, dino)


def test_overlay_lines_are_head_means_and_colour_is_training_kind():
    res = _results(layouts={m: {"num_prefix": 1, "grid": [14, 14], "patch_size": [16, 16]}
                            for m in ("deit-s", "dinov2-s14")})
    res.meta["models"]["third"] = {"training": "supervised"}
    extra = res.table[res.table.model == "deit-s"].assign(model="third", value=lambda d: d["value"] + 1)
    res = Results(pd.concat([res.table, extra]), meta=res.meta)
    fig, ax = plots.layer_overlay(res)
    lines = {ln.get_label().split(" (")[0]: ln for ln in ax.get_lines()}
    t = res.table[res.table.model == "dinov2-s14"]
    means = t.groupby("layer")["value"].mean().to_numpy()
    np.testing.assert_allclose(lines["dinov2-s14"].get_ydata(), means, rtol=1e-12)
    assert lines["deit-s"].get_color() == lines["third"].get_color() != lines["dinov2-s14"].get_color()
    assert lines["deit-s"].get_linestyle() != lines["third"].get_linestyle()


def test_every_figure_from_the_parquet_alone(tmp_path):
    res = _results()
    res.to_parquet(tmp_path / "results.parquet")
    res.save_arrays(tmp_path / "arrays.npz")
    back = Results.read_parquet(tmp_path / "results.parquet")  # nothing else: meta rides in the parquet
    paths = plots.render_all(back, tmp_path / "figures", kinds=["depth", "overlay", "heatmap", "summary"])
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{k}_mad.{e}" for k in ("depth", "overlay", "heatmap", "summary") for e in ("png", "svg"))
    for p in paths:
        assert p.stat().st_size > 1000
        assert p.read_bytes()[:4] == (b"\x89PNG" if p.suffix == ".png" else p.read_bytes()[:4])
    assert b"<svg" in (tmp_path / "figures" / "depth_mad.svg").read_bytes()[:2000]
    # map overlays: arrays.npz (with the input views the maps are drawn over: tests/test_maps_view.py)
    back.arrays = Results.read_arrays(tmp_path / "arrays.npz")
    paths = plots.render_all(back, tmp_path / "figures", kinds=["maps"])
    assert [p.name for p in paths] == ["maps_cls_map.png", "maps_cls_map.svg"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_figures_fit_a_paper_page():
    fig, _ = plots.layer_overlay(_results())
    assert fig.get_size_inches()[0] == pytest.approx(7.0)
    fig, _ = plots.summary_points(_results(), layers=[0, 2])
    fig, ax = plots.head_heatmap(_results(), ax=fig.axes[0])  # an ax of one's own: one model
    assert ax.get_ylabel() == "layer"


def test_missing_seaborn_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "seaborn", None)
    with pytest.raises(ProbekitError, match="pip install 'seaborn"):
        plots.depth_profile(_results())


def test_unknown_metric_and_kind_say_what_exists():
    with pytest.raises(ProbekitError, match="they hold: mad"):
        plots.depth_profile(_results(), "entropy")
    with pytest.raises(ProbekitError, match="choose from depth, overlay"):
        plots.render_all(_results(), "/tmp/unused", kinds=["violin"])


# regression: the depth profile's uniform-attention line of ``mad[queries=cls]`` was the patch-query value
@pytest.mark.parametrize("units", ["px", "fraction"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_uniform_reference_line_matches_mad_of_uniform_attention_for_cls_queries(units, renormalize):
    from probekit.views.plots._common import _reference

    lay = pk.TokenLayout(num_prefix=2, grid=(3, 5), patch_size=(8, 16), prefix_kinds=("cls", "dist"))
    mad = pk.metrics.get("mad")(queries="cls", units=units, renormalize=renormalize)
    t = lay.num_tokens
    expected = mad.compute(torch.full((1, 1, t, t), 1 / t), lay).item()
    meta = {"model": "m", "layout": {"num_prefix": 2, "grid": [3, 5], "patch_size": [8, 16]},
            "metrics": {mad.label: {"name": "mad", "options": mad.options()}}}
    table = {"model": ["m"], "image": ["a"], "layer": [0], "head": [0], "metric": [mad.label], "value": [1.0]}

    assert _reference(Results(pd.DataFrame(table), meta=meta), "m", mad.label) == pytest.approx(expected, rel=1e-6)


# regression: a dataset-level array (CKA's [L, L]) crashed the map figures, costing a run all its figures
def test_a_dataset_level_array_does_not_cost_the_figures(tmp_path, toy_backend, run_file):
    pytest.importorskip("seaborn")
    p = run_file(name="cka", images={"path": "sample", "count": 4}, metrics=["mad", "cka"], batch_size=4,
                 figures=["depth", "maps"])
    cmp = compare(p, out=tmp_path / "out")
    assert cmp.figure_error is None
    assert sorted(f.name for f in cmp.figures) == ["depth_mad.png", "depth_mad.svg"]
    assert cmp.results.arrays["toy:vit/cka"].shape == (2, 2)


# regression: ``render_all(metrics=...)`` ignored map metrics
def test_render_all_draws_only_the_metrics_asked_for(tmp_path, toy_backend):
    pytest.importorskip("seaborn")

    res = pk.probe(pk.load("toy:vit", depth=2), torch.randn(2, 3, 32, 32), metrics=["mad", "cls_map"])
    only_mad = plots.render_all(res, tmp_path / "a", kinds=["depth", "maps"], metrics=["mad"])
    assert sorted(f.name for f in only_mad) == ["depth_mad.png", "depth_mad.svg"]
    only_map = plots.render_all(res, tmp_path / "b", kinds=["depth", "maps"], metrics=["cls_map"])
    assert sorted(f.name for f in only_map) == ["maps_cls_map.png", "maps_cls_map.svg"]


def test_map_figures_are_drawn_for_patch_grid_maps_only(tmp_path, toy_backend):
    pytest.importorskip("seaborn")

    res = pk.probe(pk.load("toy:vit", depth=2), torch.randn(4, 3, 32, 32),
                   metrics=["cls_map", "distance_profile", "cka"], batch_size=4)
    assert res.arrays["toy:vit/distance_profile"].ndim == 4  # [images, layers, heads, bins]: no image
    paths = plots.render_all(res, tmp_path, kinds=["maps"])
    assert sorted(p.name for p in paths) == ["maps_cls_map.png", "maps_cls_map.svg"]


# -- a metric declares its display name and reference value; figures read them (no built-in names) -----
def _one_metric(label: str, meta: dict) -> Results:
    rows = [("m", f"i{i}", layer, head, label, 0.1 * layer + 0.01 * head + 0.001 * i)
            for i in range(3) for layer in range(2) for head in range(2)]
    return Results(pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value"]), {},
                   {"metrics": {label: meta},
                    "models": {"m": {"layout": {"num_prefix": 1, "grid": [3, 4], "patch_size": [8, 8]}}}})


def test_plugin_metric_axis_reads_its_display_name_and_draws_its_reference():
    class Spread(pk.Metric):
        """Mean attention on patch keys (a test plugin with a reference value)."""

        name = "spread_test"
        display_name = "attention spread"
        unit = "share"
        power: int = 1

        def row_values(self, block):
            return block.patch_rows().mean(-1) ** self.power

        def reference_value(self, layer):
            return 1 / layer.num_tokens

    pk.metrics.register(Spread)
    try:
        m = Spread(power=2)
        res = _one_metric(m.label, {"name": m.name, "options": m.options(), "unit": m.unit})
        _, axes = plots.depth_profile(res, m.label)
        assert axes[0].get_ylabel() == "attention spread [power=2] (share)"
        (line,) = _dashed(axes[0])
        assert line.get_ydata()[0] == pytest.approx(1 / 13)
    finally:
        pk.metrics.unregister("spread_test")
    # without the plugin installed, the run's own record still names the axis; no reference line
    res = _one_metric("spread_test", {"name": "spread_test", "options": {}, "unit": "share",
                                      "display_name": "attention spread"})
    _, axes = plots.depth_profile(res, "spread_test")
    assert axes[0].get_ylabel() == "attention spread (share)" and not _dashed(axes[0])


def test_entropy_reference_line_is_ln_n_and_label_is_its_display_name():
    ent = pk.metrics.get("entropy")()
    assert ent.display_name == "attention entropy" and pk.metrics.get("nmi").display_name == "nmi"
    res = _one_metric("entropy", {"name": "entropy", "options": ent.options(), "unit": "nats"})
    _, axes = plots.depth_profile(res, "entropy")
    assert axes[0].get_ylabel() == "attention entropy (nats)"
    (line,) = _dashed(axes[0])
    assert line.get_ydata()[0] == pytest.approx(np.log(12))
    norm = pk.metrics.get("entropy")(normalized=True)
    assert norm.reference_value(pk.TokenLayout(num_prefix=1, grid=(3, 4), patch_size=(8, 8))) == 1.0
    assert pk.metrics.get("prefix_mass")().reference_value(pk.TokenLayout(num_prefix=1, grid=(3, 4), patch_size=(8, 8))) is None


# -- issue 22: every static figure says what its colours and lines mean ---------------------------------
def test_depth_profile_legend_explains_head_colours_and_the_uniform_line():
    fig, axes = plots.depth_profile(_results())
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["head 0", "head 1", "head 2", "uniform attention (no locality)"]  # deit-s has 3 heads
    # each head's legend colour is the colour of its dots
    dots = axes[0].collections[0]
    heads = _results().table.query("model == 'deit-s'").groupby(["layer", "head"])["value"].mean().reset_index()
    for h, handle in enumerate(legend.legend_handles[:3]):
        want = np.asarray(handle.get_color())[:3]
        got = dots.get_facecolors()[(heads["head"] == h).to_numpy()][:, :3]
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-6)
    # titles: the training kind once, never "random init (random init)"
    res = _results()
    res.meta["models"]["dinov2-s14"]["training"] = "random init"
    res.table["model"] = res.table["model"].astype(str).replace("dinov2-s14", "dinov2-s14 random init")
    res.meta["models"]["dinov2-s14 random init"] = res.meta["models"].pop("dinov2-s14")
    _, axes = plots.depth_profile(res)
    assert [a.get_title() for a in axes] == ["deit-s (supervised)", "dinov2-s14 random init"]


def test_more_heads_than_palette_colours_never_share_a_colour():
    from probekit.views.plots import _head_colours

    cols = _head_colours(16)
    assert len({tuple(np.round(c, 6)) for c in cols}) == 16


def test_summary_points_name_their_layers():
    res = _results()
    _, ax = plots.summary_points(res)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # 4 and 3 layers: first 0 and 0, middle (4-1)//2 = 1 and (3-1)//2 = 1, last 3 and 2 (named at each point)
    assert labels == ["first (layer 0)", "middle (layer 1)", "last"]
    assert sorted(t.get_text() for t in ax.texts) == ["L2", "L3"]


def test_label_colours_are_never_model_colours():
    import seaborn as sns

    from probekit.views.plots._common import LABEL_COLOURS

    res = _results()
    res.table["label"] = res.table["image"].map(lambda n: "cat" if n in ("img0.jpg", "img1.jpg") else "dog")
    fig, axes = plots.label_profile(Results(res.table, meta=res.meta))
    model_cols = {c.lower() for c in sns.color_palette("colorblind").as_hex()} | {
        "#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442", "#000000"}  # figures', report's
    drawn = {ln.get_color().lower() for a in axes for ln in a.get_lines()}
    assert drawn == {LABEL_COLOURS[0].lower(), LABEL_COLOURS[1].lower()} and not drawn & model_cols
    assert not {c.lower() for c in LABEL_COLOURS} & model_cols
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["dog (3)", "cat (2)"]  # most frequent first, image counts


def test_map_figures_share_one_colour_scale():
    res = _results()
    res.arrays["dinov2-s14/cls_map"] = np.full((5, 3, 2, 16, 16), 1 / 256, dtype=np.float32)  # uniform
    fig, axes = plots.attention_maps(res, "cls_map")
    rows, cols = axes.shape
    top = float(max(res.arrays["deit-s/cls_map"][:cols, -1].mean(1).max(), 1 / 256))  # heads averaged
    (clim,) = {axes[r, c].get_images()[-1].get_clim() for r in range(rows) for c in range(cols)}
    assert rows == 2 and clim == (0.0, pytest.approx(top, rel=1e-6))
    assert len(fig.axes) == rows * cols + 1  # the maps and one colour bar
