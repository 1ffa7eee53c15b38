"""The kit's perturbation-based geometry check on every kind of layer: windows, shifted windows
(timm rolls then pads, transformers pads then rolls), pooled keys, grids that shrink between
stages, class attention and overlapping patch embeddings, through timm (Swin, SwinV2, SAM, PiT,
CaiT, Twins, MViTv2) and transformers (Swin, SwinV2, SAM encoder); each deliberate geometry mistake
(a roll not undone, a shift forgotten, pooled keys misplaced, timm's order on transformers'
Swin) fails with a message that names the layer and what to fix.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from probekit.geometry import LayerGeometry, ModelGeometry
from probekit.testing import check_adapter
from probekit.testing.geometry import expected_moved_tokens, patch_box
from probekit.testing.geometry_checks import check_hidden_keys, check_patch_geometry
from probekit.testing.reach import expected_moves
from probekit.tokens import TokenLayout
from probekit_tests_windowed import FAMILIES, build, hf_sam_encoder, hf_swin, hf_swinv2, mvit

MODELS = {
    **{f: (lambda f=f: build(f)) for f in FAMILIES},
    **{f"{f}-other-size": (lambda f=f: build(f, FAMILIES[f][2])) for f in FAMILIES},
    "mvitv2": lambda: mvit(64),
    "mvitv2-cls-96": lambda: mvit(96, cls_token=True),
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_geometry_checks_pass_on_every_layer_of_timm_families(model):
    pm = MODELS[model]()
    detail = check_patch_geometry(model, pm)
    assert f"x {pm.num_layers} layers" in detail  # every layer checked, none skipped
    check_hidden_keys(model, pm)


@pytest.mark.parametrize("size", [(32, 32), (40, 56)], ids=["native", "padded"])
def test_geometry_checks_pass_on_transformers_swin(size):
    pm = hf_swin()
    assert "x 4 layers" in check_patch_geometry("hf-swin", pm, image_size=size)
    check_hidden_keys("hf-swin", pm)


@pytest.mark.parametrize("model, layers", [("swinv2", 4), ("sam", 3)])
def test_the_whole_kit_passes_on_transformers_swinv2_and_sam(model, layers):
    pm = hf_swinv2() if model == "swinv2" else hf_sam_encoder(80)
    records = {r.check: r for r in check_adapter(pm)}  # raises on any failure
    assert f"x {layers} layers" in records["check_patch_geometry"].reason
    assert records["check_hidden_keys"].status == "passed"


@pytest.mark.parametrize("family", ["swinv2", "pit"])  # swin, sam, cait: test_adapter_windowed.py
def test_the_whole_kit_passes_and_runs_the_geometry_checks(family):
    records = {r.check: r for r in check_adapter(build(family))}  # raises on any failure
    assert records["check_patch_geometry"].status == "passed"
    assert records["check_hidden_keys"].status == "passed"


def test_first_window_layer_expects_exactly_the_rolled_token():
    # 8x8 grid of 4 px, 4x4 windows shifted by 2: cell (0, 0) sits at rolled (6, 6), window 3, index 10
    shifted = LayerGeometry.windows((8, 8), 4, 4, shift=2)
    q, k = expected_moved_tokens(shifted, patch_box(TokenLayout(0, (8, 8), 4), 0, 0))
    assert q == k == {(3, 10)}
    plain = LayerGeometry.windows((8, 8), 4, 4)
    assert expected_moved_tokens(plain, (0, 4, 0, 4)) == ({(0, 0)}, {(0, 0)})
    # a box over two cells moves both; a global layout keeps its token indices
    assert expected_moved_tokens(TokenLayout(1, (2, 3), 4), (0, 4, 2, 6)) == {1, 2}


def test_reach_grows_through_windows_and_is_bounded_until_a_global_layer():
    lay = TokenLayout(0, (8, 8), 4)
    layers = [LayerGeometry.windows((8, 8), 4, 4), LayerGeometry.windows((8, 8), 4, 4, shift=2), lay]
    exp = expected_moves(layers, patch_box(lay, 3, 3), (32, 32), lay)
    assert exp[0].exact and int(exp[0].may_q.sum()) == 1
    # layer 1: cells (0..3, 0..3) changed in window 0; rolled by 2 they are the top-left 2x2 of shifted
    # window 0 (the box at its (1, 1)), a half of the 4x2 regions of windows 1 and 2 (so all 8 rows of
    # those regions may move: half their keys changed), and the 2x2 corner region of window 3
    assert not exp[1].exact and torch.nonzero(exp[1].must_q).tolist() == [[0, 5]]
    may = [torch.nonzero(exp[1].may_q[w]).flatten().tolist() for w in range(4)]
    assert may == [[0, 1, 4, 5], [2, 3, 6, 7, 10, 11, 14, 15], [8, 9, 10, 11, 12, 13, 14, 15], [10, 11, 14, 15]]
    assert torch.equal(exp[1].may_k, exp[1].may_q)
    assert exp[2].may_q.all()  # global after windows: every token reachable; the box's token must move
    assert torch.nonzero(exp[2].must_q).tolist() == [[0, 27]]
    # a corner cell rolls into a 2x2 region: a row of 4 keys is too short to say its query moved
    corner = expected_moves(layers, patch_box(lay, 0, 0), (32, 32), lay)
    assert not corner[1].must_q.any() and corner[1].may_q[3, 10]


def test_pooled_keys_have_a_halo_and_no_must():
    lay = TokenLayout(0, (16, 16), 4)
    g = LayerGeometry.pooled((16, 16), 4, (4, 4), 16)
    exp = expected_moves([g], patch_box(lay, 15, 15), (64, 64), lay)[0]
    assert not exp.must_k.any() and int(exp.may_k.sum()) == 1  # the bottom-right key only
    assert int(exp.must_q.sum()) == 1 and int(exp.may_q.sum()) == 4  # its cell, plus one cell of pooling halo


def _broken(pm, fix):
    real = pm.adapter.geometry

    def geometry(x):
        geo = real(x)
        return ModelGeometry(geo.layout, {i: fix(geo.layer(i)) for i in range(geo.num_layers)}, geo.num_layers)

    pm.adapter.geometry = geometry
    return pm


def _roll_not_undone(g, keep_mask=True):
    if getattr(g, "kind", None) != "window" or g.visible is None:
        return g
    u = LayerGeometry.windows(g.grid, g.stride, g.window, image_size=g.image_size, base_grid=g.base_grid)
    return dataclasses.replace(g, query_pos=u.query_pos, key_pos=u.key_pos, key_cell=u.key_cell,
                               query_kind=u.query_kind, key_kind=u.key_kind,
                               visible=g.visible if keep_mask else None, _cache={})


def _keys_at_query_cells(g):
    if getattr(g, "kind", None) != "pooled":
        return g
    n = int((g.key_kind[0] != 0).sum())  # prefix keys lead
    cells = g.key_cell[0, n:]
    pos = torch.stack([(cells // g.key_grid[1] + 0.5) * g.stride[0], (cells % g.key_grid[1] + 0.5) * g.stride[1]], -1)
    return dataclasses.replace(g, key_pos=torch.cat([g.key_pos[0, :n], pos.double()])[None], _cache={})


def _failures(pm) -> dict[str, str]:
    return {r.check: r.reason for r in check_adapter(pm, on_fail=None) if r.status == "failed"}


@pytest.mark.parametrize("family, size", [("swin", None), ("swin", (48, 64)), ("swinv2", None)])
def test_a_roll_not_undone_fails_with_the_layer_and_the_fix(family, size):
    failed = _failures(_broken(build(family, size), _roll_not_undone))
    assert set(failed) == {"check_patch_geometry"}, failed  # the mask is right, the positions are not
    msg = failed["check_patch_geometry"]
    assert "layer 1 (window:" in msg and "beyond what it can reach by this layer" in msg, msg
    assert "undo the cyclic roll" in msg, msg


def test_a_forgotten_shift_fails_both_checks():
    failed = _failures(_broken(build("swin"), lambda g: _roll_not_undone(g, keep_mask=False)))
    assert "layer 1 (window:" in failed["check_patch_geometry"]
    assert "hides 4128 query-key pairs" in failed["check_hidden_keys"], failed


def test_timms_order_on_transformers_swin_fails_where_padding_meets_the_roll():
    def roll_then_pad(g):
        if getattr(g, "kind", None) != "window" or g.visible is None:
            return g
        return LayerGeometry.windows(g.grid, g.stride, g.window, 2, image_size=g.image_size, base_grid=g.base_grid)

    pm = _broken(hf_swin(), roll_then_pad)
    with pytest.raises(AssertionError, match=r"layer 1 \(window:.*undo the cyclic roll"):
        check_patch_geometry("hf-swin", pm, image_size=(40, 56))


@pytest.mark.parametrize("cls_token", [False, True])
def test_misplaced_pooled_keys_fail_at_the_first_layer(cls_token):
    pm = _broken(mvit(64, cls_token), _keys_at_query_cells)
    with pytest.raises(AssertionError, match=r"layer 0 \(pooled:.*moved key tokens at .* beyond .*pooled keys sit"):
        check_patch_geometry("mvitv2", pm)


class _DropsLayer1:
    """A sink proxy that never passes on layer 1's attention (a tap that misses a block)."""

    def __init__(self, sink):
        self._sink = sink

    def __getattr__(self, name):
        return getattr(self._sink, name)

    def attention(self, layer, attn):
        if layer != 1:
            self._sink.attention(layer, attn)


def test_a_layer_the_tap_never_reports_fails_instead_of_being_skipped():
    pm = build("swinv2")
    real = pm.adapter.tap
    pm.adapter.tap = lambda sink: real(_DropsLayer1(sink))
    with pytest.raises(AssertionError, match=r"describes token attention in layers \[0, 1, 2, 3\], the tap reported "
                                             r"\[0, 2, 3\]"):
        check_patch_geometry("swinv2", pm)
