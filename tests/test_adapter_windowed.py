"""timm families whose layers are not all global: Swin, SwinV2, the SAM/ViTDet encoder, CaiT, PiT
(grids that shrink between stages), MViTv2 (pooled keys) and Twins (padded windows, sub-sampled keys).

Parity with each library's own softmax output (fused attention off, ``attn_drop``'s input; CaiT's
talking heads: the softmax of ``proj_l``) with every parameter randomized (relative-position
tables, SwinV2's logit scale and continuous position bias MLP, q/v biases), the tap running
fused and unfused, at the native size and at another size (padding and shifted windows); then
the engine's values at random init against the uniform closed form of each stage.
"""

from __future__ import annotations

import pytest
import torch

import probekit as pk
from probekit.errors import UnsupportedArchitectureError
from probekit.testing import randomize_parameters
from probekit.plugins.adapters.timm import TimmWindowedAdapter
from probekit_tests_windowed import FAMILIES, build, hf_swin, mvit

TOL = 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "other-size"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tap_equals_the_library_softmax(family, native, fused):
    pm = build(family, None if native else FAMILIES[family][2], fused)
    assert isinstance(pm.adapter, TimmWindowedAdapter)
    x = pm.example_input(2, seed=1)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert sorted(got) == sorted(ref) == list(range(pm.num_layers))
    geo = pm.geometry(x)
    for i in ref:
        g = geo.layer(i)
        b, tq, tk = ref[i].shape[0], ref[i].shape[2], ref[i].shape[3]
        if isinstance(g, pk.TokenLayout):
            assert b == 2 and tq == tk == g.num_tokens
        else:
            g.check(b, tq, tk, i)
            assert b == 2 * g.groups
        torch.testing.assert_close(got[i], ref[i], atol=TOL, rtol=0)
    # randomized tables make heads far from uniform: a bug in the bias would show
    assert max(p.amax(-1).mean().item() * p.shape[-1] for p in got.values()) > 2


def test_swin_windows_shift_and_pad_as_the_model_does():
    pm = build("swin", (48, 64))
    geo = pm.geometry(pm.example_input(1))
    blocks = [b for s in pm.model.layers for b in s.blocks]
    for i, blk in enumerate(blocks):
        g = geo.layer(i)
        assert g.window == tuple(blk.window_size)
        mask = blk.attn_mask
        if mask is None:
            assert g.visible is None
        else:  # our regions are the model's mask: 0 where visible, -100 where hidden
            assert torch.equal(g.visible, mask == 0)
    assert geo.layer(0).grid == (12, 16) and geo.layer(2).grid == (6, 8) and geo.stage_starts() == [2]
    assert geo.layer(2).stride == (8, 8)


def uniform_value(g) -> float:
    from probekit.engine.grouped import reduce_groups
    from probekit.attention import LayerAttention
    from probekit.engine.probe import build_metrics

    if isinstance(g, pk.TokenLayout):
        return pk.metrics.get("mad")().compute(torch.full((1, 1, g.num_tokens, g.num_tokens), 1 / g.num_tokens), g).item()
    m = build_metrics(["mad"])[0]
    return reduce_groups([m], LayerAttention(probs_given=g.uniform()), g, 2**20)[m.label].item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_init_mad_is_the_uniform_value_of_each_layer(family):
    # a model at random init attends almost uniformly: each layer's MAD is its geometry's uniform value
    spec, kw = FAMILIES[family][:2]
    torch.manual_seed(0)
    pm = pk.load(spec, pretrained=False, **kw)
    x = pm.example_input(2)
    table = pk.probe(pm, x, metrics=["mad"]).table
    per_layer = table.groupby("layer").value.mean()
    geo = pm.geometry(x)
    for i, v in per_layer.items():
        assert v == pytest.approx(uniform_value(geo.layer(i)), rel=0.05), f"layer {i}"


def test_metrics_that_need_global_attention_refuse_windows_with_the_reason():
    pm = build("swin")
    with pytest.raises(UnsupportedArchitectureError, match=r"rollout.*needs global attention.*layer 0.*window"):
        pk.probe(pm, pm.example_input(1), metrics=[{"rollout": {"query": "mean"}}])


def test_other_input_size_than_built_is_refused_with_the_fix():
    pm = build("swin")
    with pytest.raises(pk.LayoutError, match=r"image_size=\(64, 64\)"):
        pm.layout(torch.randn(1, 3, 64, 64))


def test_cait_class_attention_layers_are_measured_from_the_class_token():
    pm = build("cait")
    x = pm.example_input(2)
    geo = pm.geometry(x)
    kinds = [geo.summary(i)["kind"] for i in range(pm.num_layers)]
    assert kinds == ["global", "global", "class", "class"]
    with pytest.raises(UnsupportedArchitectureError, match=r"needs a class token, but layer 0 of this model has no class"):
        pk.probe(pm, x, metrics=[{"mad": {"queries": "cls"}}])
    res = pk.probe(pm, x, metrics=["mad", "prefix_mass"]).table
    cls_q = pk.probe(pm, x, metrics=[{"mad": {"queries": "cls"}}], layers=[2, 3]).table
    a = res[(res.layer >= 2) & (res.metric == "mad")].value.to_numpy()
    assert a == pytest.approx(cls_q.value.to_numpy())  # a class-attention layer's only query is its class token
    # the patch layers have no class token: prefix mass 0 there, > 0 where the class token is a key
    pmass = res[res.metric == "prefix_mass"].groupby("layer").value.mean()
    assert pmass[0] == 0 and pmass[1] == 0 and pmass[2] > 0


@pytest.mark.parametrize("cls_token", [False, True], ids=["no-cls", "cls"])
@pytest.mark.parametrize("size", [64, 96])
def test_mvit_pooled_keys_equal_the_library_softmax(size, cls_token):
    pm = mvit(size, cls_token)
    x = pm.example_input(2, seed=1)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert sorted(got) == sorted(ref) == [0, 1, 2]
    geo = pm.geometry(x)
    n = size // 4
    assert [geo.layer(i).grid for i in range(3)] == [(n, n), (n // 2, n // 2), (n // 2, n // 2)]
    # keys pooled by 4 in stage 1; at the stage start by 2 from the 16x16 input (with the queries), then by 2
    assert [geo.layer(i).key_grid for i in range(3)] == [(n // 4, n // 4), (n // 2, n // 2), (n // 4, n // 4)]
    for i in ref:
        g = geo.layer(i)
        g.check(ref[i].shape[0], ref[i].shape[2], ref[i].shape[3], i)
        torch.testing.assert_close(got[i], ref[i], atol=TOL, rtol=0)
    assert max(p.amax(-1).mean().item() * p.shape[-1] for p in got.values()) > 2
    table = pk.probe(pm, x, metrics=["mad", "entropy"]).table
    assert set(table.layer) == {0, 1, 2}
    from probekit.plugins.adapters._timm_geometry import _ORIGINAL_SOFTMAX

    assert torch.Tensor.softmax is _ORIGINAL_SOFTMAX  # the spy is gone once the tap exits


def test_depth_profile_marks_stages_and_each_layers_uniform_level(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from probekit.views.plots import depth_profile

    pm = build("swin")
    res = pk.probe(pm, pm.example_input(2), metrics=["mad"])
    res = pk.Results.read_parquet(res.to_parquet(tmp_path / "r.parquet"))  # the geometry travels along
    fig, axes = depth_profile(res)
    geo = pm.geometry(pm.example_input(1))
    assert axes[0].stage_starts == [2]
    assert axes[0].ref_value == pytest.approx([uniform_value(geo.layer(i)) for i in range(4)], rel=1e-5)
    # stage 1: 7x7 windows of 4 px; shifted: regions of 4 and 3 rows/cols; stage 2: one 7x7 window of 8 px
    assert axes[0].ref_value[0] == pytest.approx(14.4379, abs=1e-3)
    assert axes[0].ref_value[2] == pytest.approx(2 * 14.4379, abs=2e-3)


@pytest.mark.parametrize("family", ["swin", "sam", "cait", "twins-svt"])
def test_the_conformance_kit_passes_on_windowed_layers(family):
    from probekit.testing import check_adapter

    records = check_adapter(build(family))  # raises on any failure
    status = {r.check: r.status for r in records}
    # hidden states: shapes and layouts checked here, values in test_hidden_staged.py (declared not applicable)
    assert status.pop("check_hidden_is_block_output") == "skipped" and status["check_hidden_states"] == "passed"
    assert set(status.values()) == {"passed"} and len(status) >= 7


@pytest.mark.parametrize("size", [(32, 32), (40, 56)], ids=["native", "padded"])
def test_transformers_swin_equals_its_eager_attention(size):
    # transformers pads to whole windows and then rolls (timm rolls first): another geometry, same rules
    pm = hf_swin()
    x = pm.example_input(2, image_size=size, seed=1)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert sorted(got) == sorted(ref) == [0, 1, 2, 3]
    geo = pm.geometry(x)
    for i in ref:
        geo.layer(i).check(ref[i].shape[0], ref[i].shape[2], ref[i].shape[3], i)
        torch.testing.assert_close(got[i], ref[i], atol=TOL, rtol=0)
    shifted = geo.layer(1)
    assert shifted.visible is not None
    # where the model's mask hides a key (softmax weight ~e^-100), our geometry hides it too
    vis = shifted.visible.repeat(2, 1, 1)
    assert ref[1][:, 0][~vis].max() < 1e-30 and ref[1][:, 0][vis].min() > 1e-30
    table = pk.probe(pm, x, metrics=["mad"]).table
    assert set(table.layer) == {0, 1, 2, 3}


@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=["native", "other-size"])
def test_xcit_channel_attention_is_refused_and_its_class_attention_measured(size):
    pm = pk.load("timm:xcit_nano_12_p16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                 img_size=size, cls_attn_layers=2)
    randomize_parameters(pm.model, scale=0.2)
    x = pm.example_input(2, seed=1)
    with pytest.raises(UnsupportedArchitectureError, match=r"mad.*layer 0 of this model attends over channels"):
        pk.probe(pm, x, metrics=["mad"])
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert sorted(got) == sorted(ref) == [2, 3]  # the class-attention layers; channel attention is not tapped
    for i in ref:
        # the class token over itself and the 4x4 (3x5) patches
        assert got[i].shape == (2, 2, 1, 1 + (size[0] // 16) * (size[1] // 16))
        torch.testing.assert_close(got[i], ref[i], atol=TOL, rtol=0)
    table = pk.probe(pm, x, metrics=["mad", "prefix_mass"], layers=[2, 3]).table
    assert set(table.layer) == {2, 3}
