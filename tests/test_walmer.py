"""Walmer et al. 2023's attention analyses (issue 23): attention offset and spread, query-centred
aggregated maps, and per-class maps, each against closed forms or plain numpy references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import probekit as pk
from probekit.errors import ConfigError
from probekit.geometry import LayerGeometry, ModelGeometry
from probekit.plugins.metrics.aggregated import AggregatedMap
from probekit.plugins.metrics.centroid import AttentionOffset, AttentionSpread
from probekit.testing.paths import _engine, _qkv, check_engine_paths, check_grouped_paths
from probekit.tokens import TokenLayout
from probekit.views.plots.aggregated import aggregated_offset

LAY = TokenLayout(num_prefix=1, grid=(3, 4), patch_size=(8, 16))  # non-square grid, non-square patches
H, W = LAY.grid
UNITS = {"patch": (1.0, 1.0), "px": (8.0, 16.0), "fraction": (1 / 3, 1 / 3)}  # per-axis step, max(h, w) - 1 = 3


def _yx(units: str) -> np.ndarray:
    """Patch centres (row, col) of LAY in ``units``, row-major, [N, 2], written out by hand."""
    sy, sx = UNITS[units]
    return np.array([(i // W * sy, i % W * sx) for i in range(H * W)])


def _rows_on(keys: list[int]) -> torch.Tensor:
    """[1, 1, T, T] attention: query token t puts all its mass on token keys[t]."""
    t = LAY.num_tokens
    p = torch.zeros(1, 1, t, t)
    p[0, 0, torch.arange(t), torch.tensor(keys)] = 1.0
    return p


def _value(metric, probs, layout=LAY) -> float:
    return metric.compute(probs, layout).item()


# -- offset and spread: closed forms --------------------------------------------------------------
@pytest.mark.parametrize("units", ["patch", "px", "fraction"])
def test_identity_attention_has_offset_0_and_spread_0(units):
    eye = torch.eye(LAY.num_tokens)[None, None]
    assert _value(AttentionOffset(units=units), eye) == 0.0
    assert _value(AttentionSpread(units=units), eye) == 0.0
    assert _value(AttentionSpread(units=units, measure="rms"), eye) == 0.0


@pytest.mark.parametrize("units", ["patch", "px", "fraction"])
def test_attention_on_one_key_is_offset_by_the_distance_to_it_with_spread_0(units):
    key = 6  # patch (1, 2)
    probs = _rows_on([LAY.num_prefix + key] * LAY.num_tokens)
    pos = _yx(units)
    expected = np.linalg.norm(pos - pos[key], axis=1).mean()
    assert _value(AttentionOffset(units=units), probs) == pytest.approx(expected, rel=1e-6)
    assert _value(AttentionSpread(units=units), probs) == pytest.approx(0.0, abs=1e-6)
    assert _value(AttentionSpread(units=units, measure="rms"), probs) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("units", ["patch", "px", "fraction"])
def test_uniform_attention_closed_forms(units):
    # uniform over every token (the CLS too): renormalized over the patches, the centroid of every query is
    # the grid centre ((h-1)/2, (w-1)/2); offset = each query's distance from it, spread = each patch's
    sy, sx = UNITS[units]
    uniform = torch.full((2, 3, LAY.num_tokens, LAY.num_tokens), 1 / LAY.num_tokens)
    to_centre = np.mean([np.hypot((r - (H - 1) / 2) * sy, (c - (W - 1) / 2) * sx) for r in range(H) for c in range(W)])
    rms = np.sqrt(((H * H - 1) * sy * sy + (W * W - 1) * sx * sx) / 12)  # the variance of a uniform grid per axis
    for metric, expected in [(AttentionOffset(units=units), to_centre), (AttentionSpread(units=units), to_centre),
                             (AttentionSpread(units=units, measure="rms"), rms)]:
        got = metric.compute(uniform, LAY)
        assert got.shape == (2, 3)
        torch.testing.assert_close(got, torch.full((2, 3), expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        assert metric.reference_value(LAY) == pytest.approx(expected, rel=1e-9)
    if units == "patch":  # the numbers themselves, for a 3 x 4 grid
        assert rms == pytest.approx(np.sqrt(23 / 12))


def test_rows_with_no_patch_mass_count_as_centred_on_their_query():
    # every patch query on the CLS token: renormalized rows are empty, offset and spread 0 (not the origin's)
    probs = _rows_on([0] * LAY.num_tokens)
    assert _value(AttentionOffset(), probs) == 0.0 and _value(AttentionSpread(), probs) == 0.0


def test_offset_and_spread_against_plain_numpy_on_random_attention():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(2, 2, LAY.num_tokens, LAY.num_tokens, generator=g), -1)
    a = probs[:, :, 1:, 1:].double().numpy()
    a = a / a.sum(-1, keepdims=True)
    pos = _yx("px")
    c = a @ pos                                                  # [B, H, N, 2] centroids
    offset = np.linalg.norm(c - pos, axis=-1).mean(-1)
    d = np.linalg.norm(pos[None, None, None] - c[..., None, :], axis=-1)  # [B, H, N, N] key - centroid
    spread, rms = (a * d).sum(-1).mean(-1), np.sqrt((a * d * d).sum(-1)).mean(-1)
    np.testing.assert_allclose(AttentionOffset(units="px").compute(probs, LAY).numpy(), offset, rtol=1e-5)
    np.testing.assert_allclose(AttentionSpread(units="px").compute(probs, LAY).numpy(), spread, rtol=1e-5)
    np.testing.assert_allclose(AttentionSpread(units="px", measure="rms").compute(probs, LAY).numpy(), rms, rtol=1e-5)


# -- aggregated maps ----------------------------------------------------------------------------
def test_aggregated_map_of_identity_is_a_single_1_at_the_centre():
    m = AggregatedMap().compute(torch.eye(LAY.num_tokens)[None, None].expand(2, 3, -1, -1), LAY)
    expected = np.zeros((2 * H - 1, 2 * W - 1))
    expected[H - 1, W - 1] = 1.0
    assert m.shape == (2, 3, 2 * H - 1, 2 * W - 1)
    np.testing.assert_allclose(m.numpy(), np.broadcast_to(expected, m.shape), atol=1e-7)


@pytest.mark.parametrize("dy, dx", [(0, 1), (1, 0), (-1, 0)])
def test_aggregated_map_of_a_shift_by_one_is_a_single_peak_one_cell_off_centre(dy, dx):
    # query (r, c) looks at (r + dy, c + dx); queries whose neighbour is off the grid look at the CLS token,
    # so renormalized over the patches their rows are empty and add nothing (Walmer et al.'s null rows)
    keys = [0]
    for i in range(H * W):
        r, c = divmod(i, W)
        inside = 0 <= r + dy < H and 0 <= c + dx < W
        keys.append(1 + (r + dy) * W + c + dx if inside else 0)
    probs = _rows_on(keys)
    n_inside = sum(k > 0 for k in keys)
    m = AggregatedMap().compute(probs, LAY)[0, 0].numpy()
    expected = np.zeros((2 * H - 1, 2 * W - 1))
    expected[H - 1 + dy, W - 1 + dx] = n_inside / (H * W)
    np.testing.assert_allclose(m, expected, atol=1e-7)
    # the paper's offset (the centroid of the map): exactly one step; probekit's per-query mean: the share of
    # queries that have a neighbour (the others are centred on themselves)
    assert aggregated_offset(m, "patch").item() == pytest.approx(1.0)
    assert aggregated_offset(m).item() == pytest.approx(1 / 3)  # fraction: / (max(h, w) - 1)
    assert aggregated_offset(m, "px", LAY.patch_size).item() == pytest.approx(8.0 if dy else 16.0)
    assert _value(AttentionOffset(units="patch"), probs) == pytest.approx(n_inside / (H * W))


def test_aggregated_map_against_plain_numpy_and_the_papers_offset():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(3, 2, LAY.num_tokens, LAY.num_tokens, generator=g), -1)
    a = probs[:, :, 1:, 1:].double().numpy()
    a = a / a.sum(-1, keepdims=True)
    ref = np.zeros((3, 2, 2 * H - 1, 2 * W - 1))
    for q in range(H * W):  # Walmer et al.'s accumulation: each query's grid pasted at its offset
        r, c = divmod(q, W)
        ref[:, :, H - 1 - r: 2 * H - 1 - r, W - 1 - c: 2 * W - 1 - c] += a[:, :, q].reshape(3, 2, H, W)
    ref /= H * W
    got = AggregatedMap().compute(probs, LAY).double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum((-2, -1)), 1.0, rtol=1e-5)
    # the paper's offset over images = the length of the mean offset vector; probekit's mean length is never below it
    pos = _yx("fraction")
    mean_vec = ((a @ pos) - pos).mean(axis=(0, 2))  # [heads, 2], over images and queries
    np.testing.assert_allclose(aggregated_offset(got.mean(0)), np.linalg.norm(mean_vec, axis=-1), rtol=1e-5)
    per_query = AttentionOffset().compute(probs, LAY).double().numpy().mean(0)
    assert (per_query >= np.linalg.norm(mean_vec, axis=-1) - 1e-6).all()


# -- windowed layers: one window over the whole grid is the global layer ------------------------------------
def test_a_window_over_the_whole_grid_gives_the_global_values():
    lay = TokenLayout(num_prefix=0, grid=(3, 4), patch_size=(8, 8))
    geo = ModelGeometry(lay, {0: LayerGeometry.windows((3, 4), (8, 8), (3, 4))}, num_layers=1)
    case = _qkv(2, lay.num_tokens, lay.num_tokens, seed=5)
    probs = torch.softmax(case["q"] @ case["k"].transpose(-1, -2) * case["scale"] + case["bias"], -1)
    for m in (AttentionOffset(), AttentionSpread(units="px"), AggregatedMap()):
        windowed = _engine(type(m)(**m.options()), case, lay, geo)
        torch.testing.assert_close(windowed, m.compute(probs, lay), rtol=1e-5, atol=1e-6)


def test_shifted_padded_windows_equal_the_global_layer_of_the_same_attention_placed_on_the_grid():
    # each window's rows (renormalized over the patch keys each query sees) scattered into one [N, N] matrix
    # at the original cells of its queries and keys (the roll undone): the global values of that matrix are
    # the windowed layer's, for offset, spread and the aggregated map
    lay = TokenLayout(num_prefix=0, grid=(3, 5), patch_size=(8, 8))
    geo = LayerGeometry.windows((3, 5), (8, 8), (2, 2), shift=(1, 1))  # padded to 4 x 6, 6 windows
    case = _qkv(2 * geo.groups, geo.num_queries, geo.num_keys, seed=9)
    probs = torch.softmax(case["q"] @ case["k"].transpose(-1, -2) * case["scale"] + case["bias"], -1)
    a = probs * geo.visible_patch_keys()[torch.arange(probs.shape[0]) % geo.groups][:, None]
    a = a / a.sum(-1, keepdim=True)
    full = torch.zeros(2, a.shape[1], lay.num_patches, lay.num_patches)
    cell = geo.key_cell
    for item in range(a.shape[0]):
        b, g = divmod(item, geo.groups)
        for i in range(geo.num_queries):
            for j in range(geo.num_keys):
                if cell[g, i] >= 0 and cell[g, j] >= 0:
                    full[b, :, cell[g, i], cell[g, j]] += a[item, :, i, j]
    model = ModelGeometry(lay, {0: geo}, num_layers=1)
    for m in (AttentionOffset(), AttentionSpread(units="px", measure="rms"), AggregatedMap()):
        torch.testing.assert_close(_engine(type(m)(**m.options()), case, lay, model), m.compute(full, lay),
                                   rtol=1e-5, atol=1e-6)


def test_aggregated_map_of_identity_in_shifted_windows_is_a_single_1_at_the_centre():
    lay = TokenLayout(num_prefix=0, grid=(4, 4), patch_size=(8, 8))
    win = LayerGeometry.windows((4, 4), (8, 8), (2, 2), shift=(1, 1))
    # logits that pick each query's own token: the identity in every window
    eye = torch.eye(4)[None, None].expand(win.groups, 1, 4, 4) * 60.0
    case = {"q": eye, "k": torch.eye(4)[None, None].expand(win.groups, 1, 4, 4), "v": None, "bias": None, "scale": 1.0}
    got = _engine(AggregatedMap(), case, lay, ModelGeometry(lay, {0: win}, num_layers=1))
    expected = np.zeros((7, 7))
    expected[3, 3] = 1.0
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-6)


# -- the engine's paths (the kit of probekit.testing) -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, options", [("attention_offset", {}), ("attention_spread", {}),
                                           ("attention_spread", {"measure": "rms", "units": "px"}),
                                           ("aggregated_map", {}), ("aggregated_map", {"renormalize": False})])
def test_every_path_gives_the_plain_value(name, options):
    m = pk.metrics.get(name)(**options)
    check_engine_paths(name, m)
    check_grouped_paths(name, m)


def test_pooled_and_class_attention_layers_are_refused_for_the_aggregated_map_before_the_run():
    from probekit.engine.checks import refuse_layers
    from probekit.errors import UnsupportedArchitectureError

    lay = TokenLayout(num_prefix=1, grid=(4, 4), patch_size=(8, 8))
    model = ModelGeometry(lay, {0: LayerGeometry.windows((4, 4), (8, 8), (2, 2), shift=(1, 1)),
                                1: LayerGeometry.pooled((4, 4), (8, 8), (2, 2), (16, 16), prefix_kinds=("cls",)),
                                2: LayerGeometry.class_attention(lay)}, num_layers=4)
    refuse_layers(AggregatedMap(), model, layers=[0, 3])  # windowed and global layers: taken
    for layer, why in [(1, "the same tokens as queries and as keys"), (2, "the same tokens as queries and as keys")]:
        with pytest.raises(UnsupportedArchitectureError, match=f"aggregated_map.*{why}.*layer {layer}"):
            refuse_layers(AggregatedMap(), model, layers=[layer])
    for m in (AttentionOffset(), AttentionSpread()):  # offset and spread read every layer
        refuse_layers(m, model)


# -- per-class maps ------------------------------------------------------------------------------
def _labelled_results(labels=("cat", "dog", "cat", "emu", "dog", "cat")):
    rng = np.random.default_rng(0)
    n = len(labels)
    maps = rng.random((n, 2, 3, H, W))  # [images, layers, heads, h, w]
    rows = [("toy", f"img{i}", layer, head, "mad", 1.0, labels[i])
            for i in range(n) for layer in range(2) for head in range(3)]
    table = pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value", "label"])
    return pk.Results(table, {"toy/cls_map": maps}), maps, np.array(labels)


def test_maps_by_label_equal_a_plain_groupby():
    from probekit.views.plots.class_maps import maps_by_label

    res, maps, labels = _labelled_results()
    out = maps_by_label(res, "cls_map")
    ref = pd.DataFrame(maps.reshape(len(labels), -1)).groupby(labels).mean()
    assert out.labels == list(ref.index) == ["cat", "dog", "emu"]
    np.testing.assert_allclose(out.maps.reshape(3, -1), ref.to_numpy(), rtol=1e-12)
    assert out.counts.tolist() == [3, 2, 1]


def test_class_maps_draw_one_panel_per_class():
    from probekit.views.plots.class_maps import class_maps

    res, maps, labels = _labelled_results()
    fig, axes = class_maps(res, "cls_map", layer=1)
    assert [a.get_title() for a in axes] == ["cat (3)", "dog (2)", "emu (1)"]
    shown = axes[1].get_images()[0].get_array()
    np.testing.assert_allclose(shown, maps[labels == "dog", 1].mean(axis=(0, 1)), rtol=1e-12)  # heads averaged


def test_per_class_maps_of_an_unlabelled_run_say_what_to_do():
    from probekit.views.plots.class_maps import maps_by_label

    res, _, _ = _labelled_results()
    res = pk.Results(res.table.drop(columns="label"), res.arrays)
    with pytest.raises(ConfigError, match="no labels: probe a labelled source"):
        maps_by_label(res, "cls_map")
    with pytest.raises(ConfigError, match="pass labels="):  # a map-only run: the table has no rows to read
        maps_by_label(pk.Results(res.table.iloc[:0].assign(label=[]), res.arrays), "cls_map")
    out = maps_by_label(res, "cls_map", labels=["a", "b"] * 3)  # or labels given, one per map
    assert out.labels == ["a", "b"] and out.counts.tolist() == [3, 3]


def test_a_labelled_probe_gives_per_class_maps_and_the_new_metrics(toy_backend, tmp_path):
    # a real run: class folders through the toy ViT; the per-class mean of cls_map and rollout equals the plain
    # groupby of the stored per-image maps by the images' labels; the new metrics land where their kind goes
    import shutil

    from probekit.inputs.sources import ClassFolder
    from probekit.views.plots.class_maps import maps_by_label

    samples = {p.name: p for p in pk.sample_images()}
    for c, files in {"cat": ["chelsea.jpg", "coffee.jpg"], "space": ["rocket.jpg"]}.items():
        (tmp_path / c).mkdir()
        for f in files:
            shutil.copy(samples[f], tmp_path / c / f)
    res = pk.probe(pk.load("toy:vit"), ClassFolder(tmp_path),
                   ["attention_offset", "attention_spread", "cls_map", "rollout", "aggregated_map"], batch_size=2)
    assert {"attention_offset", "attention_spread"} <= set(res.metrics)
    first = res.table.drop_duplicates("image")
    labels = first["label"].astype(str).to_numpy()
    assert labels.tolist() == ["cat", "cat", "space"]
    for metric in ("cls_map", "rollout"):
        arr = res.arrays[f"{res.models[0]}/{metric}"].astype(np.float64)
        out = maps_by_label(res, metric)
        assert out.labels == ["cat", "space"] and out.counts.tolist() == [2, 1]
        np.testing.assert_allclose(out.maps[0], arr[labels == "cat"].mean(0), rtol=1e-12)
        np.testing.assert_allclose(out.maps[1], arr[labels == "space"][0], rtol=1e-12)
    agg = res.arrays[f"{res.models[0]}/aggregated_map"]
    h, w = res.arrays[f"{res.models[0]}/cls_map"].shape[-2:]
    assert agg.shape[-2:] == (2 * h - 1, 2 * w - 1)
    np.testing.assert_allclose(agg.sum((-2, -1)), 1.0, rtol=1e-5)


def test_aggregated_maps_figure_draws_the_image_mean_per_layer_and_head_titled_with_the_papers_offset():
    from probekit.views.plots.aggregated import aggregated_maps

    g = torch.Generator().manual_seed(2)
    per_layer = [AggregatedMap().compute(torch.softmax(2 * torch.randn(3, 2, LAY.num_tokens, LAY.num_tokens,
                                                                        generator=g), -1), LAY) for _ in range(2)]
    arr = torch.stack(per_layer, 1).numpy()  # [images, layers, heads, 2h-1, 2w-1], as the engine stores it
    res = pk.Results(pd.DataFrame(columns=["model", "image", "layer", "head", "metric", "value"]),
                     {"toy/aggregated_map": arr})
    fig, axes = aggregated_maps(res)
    assert axes.shape == (2, 2)
    mean = arr.astype(np.float64).mean(0)
    np.testing.assert_allclose(axes[1, 0].get_images()[0].get_array(), mean[1, 0], rtol=1e-12)
    assert axes[1, 0].get_title() == f"{aggregated_offset(mean[1, 0]).item():.3f}"
    with pytest.raises(ConfigError, match="run a map metric"):
        aggregated_maps(res, "cls_map")
