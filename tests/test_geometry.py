"""Per-layer geometry: closed forms for windows, shifted windows, pooled keys and class attention,
and the grouped engine path against the global one on the same layer."""

from __future__ import annotations

import math

import pytest
import torch

import probekit as pk
from probekit.errors import LayoutError, UnsupportedArchitectureError
from probekit.geometry import LayerGeometry, ModelGeometry
from probekit.engine.probe import MetricSink, build_metrics
from probekit_tests_helpers import block, layer_value, mean_pair_distance, uniform, window_sums


# -- closed forms ------------------------------------------------------------------------------
def test_uniform_attention_in_a_7x7_window_of_4px_patches():
    # Swin stage 1: 56x56 tokens of 4 px, 64 windows of 7x7; each query sees its 49 window tokens
    geo = LayerGeometry.windows(grid=(56, 56), stride=4, window=7)
    want = mean_pair_distance(block(7, 7), block(7, 7), 4.0)
    assert want == pytest.approx(14.4379, abs=1e-4)
    got = layer_value("mad", geo, uniform(geo))
    assert got.shape == (2, 1)
    assert got.flatten().tolist() == pytest.approx([want, want], rel=1e-5)
    # the same as today's global MAD of uniform attention on one 7x7 grid of 4 px patches
    lay = pk.TokenLayout(0, (7, 7), (4, 4))
    assert pk.metrics.get("mad")().compute(torch.full((1, 1, 49, 49), 1 / 49), lay).item() == pytest.approx(want)


def test_uniform_attention_in_a_shifted_window_at_the_image_border():
    # shift 3: the bottom-right window holds 4x4, 4x3, 3x4 and 3x3 regions brought together by the
    # roll; Swin's mask keeps each query in its region, so uniform attention is uniform per region
    geo = LayerGeometry.windows(grid=(56, 56), stride=4, window=7, shift=3)
    m = build_metrics(["mad"])[0]
    per_window = window_sums(m, geo, uniform(geo, 1))[:, 0] / 49
    corner = sum(a * b * mean_pair_distance(block(a, b), block(a, b), 4.0) for a in (4, 3) for b in (4, 3)) / 49
    assert per_window[-1].item() == pytest.approx(corner, rel=1e-5)
    # a border window on the right (first band row): 7x4 and 7x3 regions
    right = sum(7 * b * mean_pair_distance(block(7, b), block(7, b), 4.0) for b in (4, 3)) / 49
    assert per_window[7].item() == pytest.approx(right, rel=1e-5)
    # an inner window sees its whole 7x7 window, distances measured in the original frame
    assert per_window[0].item() == pytest.approx(mean_pair_distance(block(7, 7), block(7, 7), 4.0), rel=1e-5)
    # positions: the roll is undone (window 0 starts at original row/col 3); no cyclic neighbour is visible
    assert geo.query_pos[0, 0].tolist() == [3.5 * 4, 3.5 * 4]
    far = (geo.query_pos[:, :, None] - geo.key_pos[:, None]).norm(dim=-1)
    assert far[geo.visible].max().item() <= 4 * math.hypot(6, 6) + 1e-9


def test_pooled_keys_with_stride_2_sit_at_their_cells_centres():
    # 4x4 query grid of 16 px, keys pooled 2x2 -> 2x2 keys at the centres of their 2x2 cells
    geo = LayerGeometry.pooled(grid=(4, 4), stride=16, kv_grid=(2, 2), kv_cell=32)
    assert geo.key_pos[0].tolist() == [[16.0, 16.0], [16.0, 48.0], [48.0, 16.0], [48.0, 48.0]]
    queries = [((r + 0.5) * 16, (c + 0.5) * 16) for r, c in block(4, 4)]
    keys = [(16.0, 16.0), (16.0, 48.0), (48.0, 16.0), (48.0, 48.0)]
    want = mean_pair_distance(queries, keys, 1.0)
    assert layer_value("mad", geo, uniform(geo)).flatten().tolist() == pytest.approx([want] * 2, rel=1e-5)
    # renormalized over the patch keys, with a class token leading queries and keys (MViTv2 *_cls)
    geo_cls = LayerGeometry.pooled(grid=(4, 4), stride=16, kv_grid=(2, 2), kv_cell=32, prefix_kinds=("cls",))
    assert (geo_cls.num_queries, geo_cls.num_keys) == (17, 5)
    got = layer_value({"mad": {"renormalize": True}}, geo_cls, uniform(geo_cls))
    assert got.flatten().tolist() == pytest.approx([want] * 2, rel=1e-5)


@pytest.mark.parametrize("geo", [
    LayerGeometry.windows(grid=(14, 14), stride=16, window=7),
    LayerGeometry.windows(grid=(10, 9), stride=8, window=4, shift=2),
    LayerGeometry.from_layout(pk.TokenLayout(1, (5, 5), (16, 16))),
], ids=["window", "shifted-padded", "global"])
def test_identity_attention_is_zero_everywhere(geo):
    eye = torch.eye(geo.num_queries).expand(3 * geo.groups, 2, -1, -1).contiguous()
    assert layer_value("mad", geo, eye).abs().max().item() == 0
    assert layer_value({"mad": {"renormalize": True}}, geo, eye).abs().max().item() == 0
    assert layer_value("entropy", geo, eye).abs().max().item() == pytest.approx(0, abs=1e-6)


def test_class_attention_over_a_uniform_grid_gives_the_cls_query_value():
    lay = pk.TokenLayout(1, (14, 14), (16, 16))
    geo = LayerGeometry.class_attention(lay)
    assert (geo.num_queries, geo.num_keys) == (1, 197)
    cls_row = torch.full((2, 1, 1, 197), 1 / 197)
    got = layer_value("mad", geo, cls_row)
    today = pk.metrics.get("mad")(queries="cls").compute(torch.full((2, 1, 197, 197), 1 / 197), lay)
    assert got.flatten().tolist() == pytest.approx(today.flatten().tolist(), rel=1e-5)
    # closed form: mass on patches (196/197) times the mean distance of a patch centre from the image centre
    centre = mean_pair_distance([((r + 0.5) * 16, (c + 0.5) * 16) for r, c in block(14, 14)], [(112.0, 112.0)], 1.0)
    assert got[0, 0].item() == pytest.approx(centre * 196 / 197, rel=1e-5)


# -- the grouped path is the global path on a global layer -------------------------------------------
@pytest.mark.parametrize("metric", [
    "mad", {"mad": {"renormalize": True}}, {"mad": {"units": "fraction"}}, {"mad": {"units": "patch"}},
    {"mad": {"queries": "cls"}}, "distance_profile", "entropy", {"entropy": {"normalized": True}},
    "prefix_mass", {"prefix_mass": {"kind": "reg"}}, "cls_map", {"cls_map": {"query": "mean"}},
])
def test_grouped_path_equals_global_path_on_a_global_layer(metric):
    torch.manual_seed(0)
    lay = pk.TokenLayout(2, (5, 6), (16, 8), ("cls", "reg"))
    probs = (torch.randn(3, 2, lay.num_tokens, lay.num_tokens) * 3).softmax(-1)
    m = build_metrics([metric])[0]
    fast = m.compute(probs, lay)
    grouped = layer_value(metric, LayerGeometry.from_layout(lay), probs)
    torch.testing.assert_close(grouped, fast, atol=2e-5, rtol=1e-5)


def test_windowed_entropy_and_maps_use_the_keys_each_query_sees():
    geo = LayerGeometry.windows(grid=(8, 8), stride=4, window=4, shift=2)
    u = uniform(geo, 1)
    # uniform over the visible keys: entropy ln(#visible) per query, normalized exactly 1
    want = geo.visible.sum(-1).double().log()
    got = layer_value("entropy", geo, u).item()
    assert got == pytest.approx(want.mean().item(), rel=1e-5)
    assert layer_value({"entropy": {"normalized": True}}, geo, u).item() == pytest.approx(1.0, rel=1e-5)
    # the mean-query map sums to 1 (every query's row lands on patches) and has the image's grid
    cmap = layer_value({"cls_map": {"query": "mean"}}, geo, u)
    assert cmap.shape == (1, 1, 8, 8) and cmap.sum().item() == pytest.approx(1.0, rel=1e-5)


def test_padding_tokens_are_neither_queries_nor_patch_keys():
    # a 5x5 grid in 4x4 windows is padded to 8x8: windows hold 16, 4, 4 and 1 real tokens
    geo = LayerGeometry.windows(grid=(5, 5), stride=16, window=4)
    assert geo.queries_per_image() == 25
    real = [[(r, c) for r in range(4 * i, 4 * i + 4) for c in range(4 * j, 4 * j + 4) if r < 5 and c < 5]
            for i in (0, 1) for j in (0, 1)]
    assert [len(w) for w in real] == [16, 4, 4, 1]
    u = torch.full((4, 1, 16, 16), 1 / 16)  # uniform over the window, padding included
    raw = sum(len(w) * mean_pair_distance(w, w, 16.0) * len(w) / 16 for w in real) / 25
    assert layer_value("mad", geo, u).item() == pytest.approx(raw, rel=1e-5)
    renorm = sum(len(w) * mean_pair_distance(w, w, 16.0) for w in real) / 25
    assert layer_value({"mad": {"renormalize": True}}, geo, u).item() == pytest.approx(renorm, rel=1e-5)
    assert layer_value("prefix_mass", geo, u).item() == 0  # padding is not a prefix token


def test_a_metric_refuses_a_layer_it_cannot_describe_before_the_forward():
    lay = pk.TokenLayout(0, (4, 4), (16, 16))
    geo = ModelGeometry(lay, {1: LayerGeometry.windows(lay.grid, 16, 2)}, num_layers=2)
    sink = MetricSink(build_metrics([{"rollout": {"query": "mean"}}]))
    with pytest.raises(UnsupportedArchitectureError, match=r"needs global attention.*layer 1.*window layer"):
        sink.start(lay, geo)
    MetricSink(build_metrics([{"rollout": {"query": "mean"}}]), layers=[0]).start(lay, geo)  # layer 0 alone is fine
    with pytest.raises(LayoutError, match="class-token query"):
        geo.layer(1).query_mask("cls")
    assert geo.stage_starts() == [] and ModelGeometry(lay, {1: LayerGeometry.windows((2, 2), 32, 2)}, 2).stage_starts() == [1]


def test_geometry_rejects_attention_of_another_shape():
    geo = LayerGeometry.windows(grid=(8, 8), stride=4, window=4)
    with pytest.raises(LayoutError, match="4 window groups per image of 16 x 16"):
        geo.check(6, 16, 16, layer=3)
