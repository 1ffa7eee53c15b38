"""The open_clip adapter against open_clip's own reference: ``nn.MultiheadAttention`` asked for
per-head weights. Tiny towers are built through the real spec path (``open_clip:ViT-B-16``
with ``vision_cfg`` overrides), every parameter noised so zero-initialised biases cannot hide
a tap that forgets them.
"""

from __future__ import annotations

import functools

import pytest
import torch

import probekit as pk
from probekit.errors import LayoutError, UnknownNameError, WeightsUnavailableError
from probekit.plugins.adapters.open_clip import OpenClipAdapter, OpenClipTimmAdapter
from probekit.testing import randomize_parameters

TEXT = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
VISION = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
TOL = 1e-5


# seeded noise on every parameter (biases, norms, layer scale, position tables): bugs that random
# init hides (zero biases, zero tables) then change the numbers
randomize = functools.partial(randomize_parameters, scale=0.2)


def tiny(spec: str = "open_clip:ViT-B-16", vision=None, **options) -> pk.ProbedModel:
    pm = pk.load(spec, pretrained=False, embed_dim=16, vision_cfg={**VISION, **(vision or {})}, text_cfg=TEXT,
                 **options)
    randomize(pm.model)
    return pm


def _max_dev(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[i] - b[i]).abs().max().item() for i in a)


@pytest.mark.parametrize("size", [None, (48, 40)], ids=["native", "48x40"])
def test_mha_tower_matches_need_weights_reference(size):
    pm = tiny(image_size=size) if size else tiny()
    h, w = size or (32, 32)
    assert pm.adapter.default_image_size == (h, w)
    x = pm.example_input(2)
    lay = pm.layout(x)
    assert lay.prefix_kinds == ("cls",) and lay.grid == (h // 8, w // 8)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert got[0].shape == (2, 2, lay.num_tokens, lay.num_tokens)
    assert not torch.allclose(got[1], torch.full_like(got[1], 1 / lay.num_tokens), atol=1e-3)
    assert _max_dev(got, ref) < TOL


def test_tap_keeps_output_and_hidden_equals_block_outputs():
    pm = tiny()
    x = pm.example_input(2)
    plain = pm.forward(x)
    hidden = pm.hidden_states(x)
    pm.attention(x)
    assert torch.equal(pm.forward(x), plain)
    with torch.inference_mode():
        _, inter = pm.model.transformer.forward_intermediates(pm.model._embeds(x), indices=pm.num_layers)
    assert len(hidden) == len(inter) == 2
    for i, tokens in enumerate(inter):
        assert torch.allclose(hidden[i], tokens, atol=1e-6)


def test_custom_block_with_qk_norm_is_tapped_at_its_softmax():
    pm = tiny(vision=dict(qk_norm=True))
    assert not isinstance(pm.model.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    x = pm.example_input(2)
    assert _max_dev(pm.attention(x), pm.adapter.reference_attention(x)) < TOL


def test_timm_trunk_tower_delegates_to_the_timm_tap():
    pm = tiny("open_clip:ViT-B-16-SigLIP", vision=dict(timm_model_name="test_vit", timm_pool="map",
                                                       timm_proj="none", image_size=160))
    assert isinstance(pm.adapter, OpenClipTimmAdapter) and pm.num_layers == 6
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(3))  # test_vit is dynamic-size
    lay = pm.layout(x)
    assert lay.grid == (4, 3) and lay.prefix_kinds == ("cls",)
    plain = pm.forward(x)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert torch.equal(pm.forward(x), plain)
    assert _max_dev(got, ref) < TOL


def test_wrong_size_is_a_layout_error_naming_the_fix():
    pm = tiny()
    with pytest.raises(LayoutError, match="image_size"):
        pm.layout(torch.randn(1, 3, 48, 40))


def test_preprocess_is_open_clips_own():
    from PIL import Image

    pm = tiny(image_size=(48, 40))
    t = pm.preprocess(Image.new("RGB", (100, 80), (255, 0, 0)))
    assert tuple(t.shape) == (3, 48, 40)
    # OpenAI CLIP normalisation of pure red
    assert abs(t[0, 0, 0].item() - (1 - 0.48145466) / 0.26862954) < 1e-4


def test_names_tags_and_missing_weights():
    with pytest.raises(UnknownNameError, match="ViT-B-16"):
        pk.load("open_clip:ViT-B-61/openai")
    with pytest.raises(UnknownNameError, match="openai"):
        pk.load("open_clip:ViT-B-16/opnai")
    with pytest.raises(UnknownNameError, match="pretrained=False"):
        pk.load("open_clip:ViT-B-16")
    try:
        pk.load("open_clip:ViT-B-32/openai")
    except WeightsUnavailableError as exc:
        assert "create_model('ViT-B-32', pretrained='openai')" in str(exc) and "pretrained=False" in str(exc)


def test_wrap_a_clip_model():
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None, embed_dim=16, vision_cfg=VISION, text_cfg=TEXT)
    assert OpenClipAdapter.can_wrap(model) and OpenClipAdapter.can_wrap(model.visual)
    ad = OpenClipAdapter.from_module(randomize(model))
    x = torch.randn(1, 3, 32, 32)
    assert ad.num_layers == 2 and ad.num_heads == 2
    sink = pk.adapter.CollectSink()
    with torch.inference_mode(), ad.tap(sink):
        ad.forward(x)
    assert _max_dev(sink.probs, ad.reference_attention(x)) < TOL


def test_random_init_of_a_tag_keeps_its_architecture_and_checkpoints_round_trip(tmp_path):
    import open_clip

    pm = pk.load("open_clip:ViT-B-16/openai", pretrained=False, embed_dim=16, vision_cfg=VISION, text_cfg=TEXT)
    assert isinstance(pm.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    model = randomize(open_clip.create_model("ViT-B-16", pretrained=None, embed_dim=16, vision_cfg=VISION,
                                             text_cfg=TEXT))
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    loaded = pk.load("open_clip:ViT-B-16", checkpoint=str(path), embed_dim=16, vision_cfg=VISION, text_cfg=TEXT)
    x = torch.randn(1, 3, 32, 32)
    assert _max_dev(loaded.attention(x), OpenClipAdapter.from_module(model).reference_attention(x)) < TOL


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks_become_the_same_additive_bias(batch_first):
    from probekit.plugins.adapters.open_clip import mha_qk

    mha = randomize(torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 16, generator=g)
    x = x if batch_first else x.transpose(0, 1)
    attn_mask = torch.rand(7, 7, generator=g) < 0.2
    attn_mask.fill_diagonal_(False)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    for kwargs in ({"attn_mask": attn_mask}, {"attn_mask": torch.randn(8, 7, 7, generator=g)},
                   {"key_padding_mask": pad, "attn_mask": attn_mask}):
        _, want = mha(x, x, x, need_weights=True, average_attn_weights=False, **kwargs)
        got = mha_qk(mha, (x, x, x), kwargs).probs()
        assert (got - want).abs().max() < TOL, kwargs


def test_conformance_kit_passes():
    from probekit.testing import check_adapter

    records = check_adapter(tiny(), on_fail=None)
    assert [(r.check, r.reason) for r in records if r.status != "passed"] == []
