"""The timm adapter against timm's own reference attention, family by family.

Every parameter gets seeded noise first: random init zeroes BEiT's relative-position tables and
q/v biases and sets DINOv2's layer scale to 1e-5, which would hide a tap that ignores them.
Models are tiny (width 32, 2 layers, patch 8) so the whole file runs in seconds.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probekit as pk
from probekit.errors import (
    ConfigError,
    LayoutError,
    UnknownNameError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)
from probekit.plugins.adapters._sdpa_spy import _PENDING, tap_blocks
from probekit.plugins.adapters.timm import TimmAdapter, TimmWindowedAdapter
from probekit.testing import randomize_parameters

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)
TOL = 1e-5
REG4 = ("cls", "reg", "reg", "reg", "reg")

# family -> (timm architecture, expected prefix kinds, a check that the family's feature is there)
FAMILIES = {
    "vit": ("vit_base_patch16_224", ("cls",), None),
    "deit": ("deit_small_patch16_224", ("cls",), None),
    "deit-distilled": ("deit_base_distilled_patch16_224", ("cls", "dist"), lambda m: m.dist_token is not None),
    "dino": ("vit_small_patch16_224", ("cls",), None),
    "dinov2": ("vit_small_patch14_dinov2", ("cls",), lambda m: hasattr(m.blocks[0].ls1, "gamma")),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", REG4, lambda m: m.reg_token.shape[1] == 4),
    "clip": ("vit_base_patch16_clip_224", ("cls",), lambda m: not isinstance(m.norm_pre, torch.nn.Identity)),
    "siglip": ("vit_base_patch16_siglip_224", (), lambda m: m.attn_pool is not None),
    "eva02": ("eva02_base_patch14_224", ("cls",), lambda m: m.rope is not None),
    "beit": ("beit_base_patch16_224", ("cls",), lambda m: m.blocks[0].attn.relative_position_bias_table is not None),
}


# seeded noise on every parameter (biases, norms, layer scale, position tables): bugs that random
# init hides (zero biases, zero tables) then change the numbers
randomize = functools.partial(randomize_parameters, scale=0.2)


def _load(family: str, **extra) -> pk.ProbedModel:
    arch, _, check = FAMILIES[family]
    pm = pk.load(f"timm:{arch}", pretrained=False, **{**TINY, **extra})
    randomize(pm.model)
    if check is not None:
        assert check(pm.model), f"{family}: the tiny model lacks the feature this case is meant to cover"
    return pm


def _sized(pm: pk.ProbedModel, size):
    """The model at input ``size``: dynamic families take any size; BEiT is resized by timm."""
    if not pm.adapter.family.dynamic_size and tuple(size) != pm.adapter.default_image_size:
        pm.model.set_input_size(img_size=size)  # timm resamples the relative-position tables
    return pm, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def _max_dev(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[i] - b[i]).abs().max().item() for i in a)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)], ids=["native", "48x40"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_matches_timm_reference(family, size):
    pm, x = _sized(_load(family), size)
    lay = pm.layout(x)
    assert lay.prefix_kinds == FAMILIES[family][1]
    assert lay.grid == (size[0] // 8, size[1] // 8) and lay.patch_size == (8, 8)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert len(got) == pm.num_layers == 2
    assert got[0].shape == (2, 2, lay.num_tokens, lay.num_tokens)
    assert got[1].sum(-1).sub(1).abs().max() < 1e-5
    assert not torch.allclose(got[0], torch.full_like(got[0], 1 / lay.num_tokens), atol=1e-3), "near-uniform"
    assert _max_dev(got, ref) < TOL, family


@pytest.mark.parametrize("family", ["vit", "dinov2-reg", "siglip", "eva02", "beit"])
def test_tap_keeps_output_and_hidden_equals_block_outputs(family):
    pm, x = _sized(_load(family), (48, 40) if family != "beit" else (32, 32))
    plain = pm.forward(x)
    with torch.inference_mode():
        inter = pm.model.forward_intermediates(
            x, indices=pm.num_layers, return_prefix_tokens=True, norm=False, output_fmt="NLC",
            intermediates_only=True)
    hidden = pm.hidden_states(x)
    attn = pm.attention(x)
    assert torch.equal(pm.forward(x), plain)  # nothing left behind after the taps
    assert F.scaled_dot_product_attention.__name__ != "_sdpa_spy"
    lay = pm.layout(x)
    for i, item in enumerate(inter):
        patches, prefix = item if isinstance(item, tuple) else (item, None)
        full = patches if prefix is None or prefix.numel() == 0 else torch.cat([prefix, patches], 1)
        assert hidden[i].shape == (2, lay.num_tokens, 32)
        assert torch.allclose(hidden[i], full, atol=1e-6), i
    assert set(attn) == {0, 1}


def test_layers_subset_and_output_under_tap():
    pm = _load("vit")
    x = pm.example_input(2)
    ref = pm.forward(x)
    sink = pk.adapter.CollectSink(layers=[1], hidden=True)
    with torch.inference_mode(), pm.adapter.tap(sink):
        out = pm.adapter.forward(x)
    assert torch.equal(out, ref)
    assert set(sink.probs) == {1} and set(sink.hiddens) == {1}


def test_unfused_modules_report_their_own_probabilities():
    pm = _load("eva02")
    for m in pm.model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = pm.example_input(2, image_size=(40, 48))
    assert _max_dev(pm.attention(x), pm.adapter.reference_attention(x)) < TOL


def test_mad_through_probe_matches_reference_probs():
    pm = _load("dinov2-reg")
    x = torch.randn(3, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    res = pk.probe(pm, x, metrics=["mad"], batch_size=2)
    mad = pk.metrics.get("mad")()
    ref = pm.adapter.reference_attention(x)
    lay = pm.layout(x)
    for layer, probs in ref.items():
        want = mad.compute(probs, lay)  # [B, H]
        got = res.table[res.table.layer == layer].sort_values(["image", "head"])["value"].to_numpy()
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), want.reshape(-1), atol=1e-4)


def test_dynamic_pad_uses_ceil_grid():
    pm = pk.load("timm:vit_base_patch16_224", pretrained=False, dynamic_img_pad=True, **TINY)
    x = torch.randn(1, 3, 44, 37)
    lay = pm.layout(x)
    assert lay.grid == (6, 5)
    assert pm.hidden_states(x)[0].shape[1] == lay.num_tokens
    plain = pk.load("timm:vit_base_patch16_224", pretrained=False, **TINY)
    with pytest.raises(LayoutError, match="dynamic_img_pad"):  # timm itself asserts divisibility
        plain.layout(x)


def test_fixed_size_family_refuses_other_sizes_clearly():
    pm = _load("beit")
    with pytest.raises(LayoutError, match="image_size"):
        pm.layout(torch.randn(1, 3, 48, 40))


def test_image_size_option_sets_native_size_and_preprocess():
    pm = pk.load("timm:vit_small_patch14_dinov2", pretrained=False, image_size=(56, 42), **{
        k: v for k, v in TINY.items() if k != "img_size"})
    assert pm.adapter.default_image_size == (56, 42)
    from PIL import Image

    t = pm.preprocess(Image.new("RGB", (90, 70)))
    assert tuple(t.shape) == (3, 56, 42)


def test_swin_is_probed_window_by_window():
    pm = pk.load("timm:swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1),
                 num_heads=(1, 2), img_size=32, window_size=4)
    assert isinstance(pm.adapter, TimmWindowedAdapter) and pm.adapter.global_attention is False
    assert pm.num_layers == 2
    x = torch.randn(1, 3, 32, 32)
    assert pm.attention(x)[0].shape == (4, 1, 16, 16)  # 4 windows of 4x4 tokens
    assert set(pk.probe(pm, x, metrics=["mad"]).table.layer) == {0, 1}
    with pytest.raises(UnsupportedArchitectureError, match="window"):
        pk.probe(pm, x, metrics=[{"rollout": {"query": "mean"}}])


def test_unknown_name_and_tag_suggest_close_names():
    with pytest.raises(UnknownNameError) as err:
        pk.load("timm:vit_base_patch16_22", pretrained=False)
    assert "vit_base_patch16_224" in str(err.value)
    with pytest.raises(UnknownNameError, match="dino"):
        pk.load("timm:vit_small_patch16_224.dinoo", pretrained=True)


def test_missing_weights_name_the_cache_and_the_fix():
    try:
        pm = pk.load("timm:vit_small_patch16_224.dino")
    except WeightsUnavailableError as exc:
        msg = str(exc)
        assert "timm/vit_small_patch16_224.dino" in msg and "pretrained=True" in msg and "hub" in msg
    else:  # cached on this machine: then it must have loaded real weights
        assert pm.meta.get("pretrained", True)


def test_from_module_and_non_vit_refusal():
    import timm

    model = randomize(timm.create_model("deit_base_distilled_patch16_224", pretrained=False, **TINY))
    assert TimmAdapter.can_wrap(model)
    ad = TimmAdapter.from_module(model)
    x = torch.randn(1, 3, 32, 32)
    assert ad.layout(x).prefix_kinds == ("cls", "dist")
    assert not TimmAdapter.can_wrap(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedArchitectureError, match="ResNet"):
        pk.load("timm:test_resnet", pretrained=False)


def test_checkpoint_file_round_trips(tmp_path):
    src = _load("dinov2-reg")
    path = tmp_path / "weights.pth"
    torch.save(src.model.state_dict(), path)
    pm = pk.load("timm:vit_small_patch14_reg4_dinov2", checkpoint=str(path), **TINY)
    x = src.example_input(1)
    assert _max_dev(pm.attention(x), src.attention(x)) == 0.0
    with pytest.raises(ConfigError, match="checkpoint '.*missing.pth' is not a file"):  # checked before building
        pk.load("timm:vit_small_patch14_reg4_dinov2", checkpoint=str(tmp_path / "missing.pth"), **TINY)


@pytest.mark.parametrize("case", ["bool-mask", "float-mask", "causal", "gqa", "scale"])
def test_sdpa_spy_reports_what_the_softmax_sees(case):
    from probekit.adapter import CollectSink
    from probekit.plugins.adapters import _sdpa_spy as tap

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    kw = {}
    if case == "bool-mask":
        kw["attn_mask"] = torch.rand(6, 6, generator=g) > 0.3
        kw["attn_mask"].fill_diagonal_(True)
    elif case == "float-mask":
        kw["attn_mask"] = torch.randn(1, 4, 6, 6, generator=g)
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw["enable_gqa"] = True
    else:
        kw["scale"] = 0.7
    sink = CollectSink()
    with tap.watch_sdpa():
        tap._PENDING.report = tap.attention_report(sink, 0)
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert F.scaled_dot_product_attention is tap._ORIGINAL_SDPA
    # the probabilities, applied to v, give back SDPA's own output
    vv = v.repeat_interleave(2, dim=1) if case == "gqa" else v
    assert torch.allclose(sink.probs[0] @ vv, out, atol=1e-5)


class _FailingAttention(nn.Module):
    """Raises before its SDPA call while ``fail`` is set (as an out-of-memory error would)."""

    def __init__(self):
        super().__init__()
        self.fail = True

    def forward(self, x):
        if self.fail:
            raise RuntimeError("out of memory (simulated)")
        q = x[:, None]
        return F.scaled_dot_product_attention(q, q, q)[:, 0]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _FailingAttention()

    def forward(self, x):
        return self.attn(x)


class _Sink:
    layers = None
    wants_attention, wants_hidden = True, False

    def __init__(self):
        self.got = []

    def attention(self, layer, attn):
        self.got.append(layer)


# regression: a tap whose attention raised before its SDPA call left the spy armed, so a later
# SDPA call in the thread reported to the old sink
def test_spy_is_disarmed_after_an_attention_that_raised():
    blocks, old = [_Block()], _Sink()
    with pytest.raises(RuntimeError, match="simulated"):
        with tap_blocks(blocks, old):
            blocks[0](torch.randn(2, 5, 4))
    assert _PENDING.report is None
    new = _Sink()
    with tap_blocks([], new):  # the spy is installed again; this SDPA call is outside any watched module
        q = torch.randn(1, 1, 5, 4)
        F.scaled_dot_product_attention(q, q, q)
    assert old.got == [] and new.got == []


@pytest.mark.parametrize("family", ["dinov2-reg", "eva02", "beit"])
def test_conformance_kit_passes(family):
    from probekit.testing import check_adapter

    records = check_adapter(_load(family), on_fail=None)
    assert [(r.check, r.reason) for r in records if r.status != "passed"] == []
    assert len(records) >= 8
