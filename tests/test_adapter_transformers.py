"""The transformers adapter against transformers' own eager attention, on tiny random models.

Every parameter gets seeded noise first: random init zeroes BEiT's relative-position table,
q/v biases, MAE's class token and more, which would hide a bias or a position bug.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.errors import UnknownNameError, WeightsUnavailableError
from probekit.plugins.adapters.transformers import ATTN_IMPLEMENTATION, TransformersAdapter

import transformers
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 8}
# repo id -> expected prefix kinds
FAMILIES = {
    "google/vit-base-patch16-224": ("cls",),
    "facebook/dino-vits16": ("cls",),
    "facebook/deit-base-distilled-patch16-224": ("cls", "dist"),
    "openai/clip-vit-base-patch16": ("cls",),
    "facebook/dinov2-small": ("cls",),
    "facebook/dinov2-with-registers-small": ("cls", "reg", "reg", "reg", "reg"),
    "google/siglip-base-patch16-224": (),
    "facebook/vit-mae-base": ("cls",),
    "microsoft/beit-base-patch16-224": ("cls",),
}
SIZES = [(32, 32), (48, 40)]  # native, and non-native non-square (grid 6 x 5)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny(repo: str, **config) -> pk.ProbedModel:
    pm = pk.load(f"hf:{repo}", pretrained=False, config={**TINY, **config})
    randomize(pm.model)
    return pm


def x_of(hw, batch=2, seed=1):
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES), ids=lambda r: r.split("/")[1])
def family(request):
    torch.manual_seed(0)
    return request.param, tiny(request.param)


@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_attention_equals_eager(family, hw):
    repo, pm = family
    x = x_of(hw)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert sorted(got) == sorted(ref) == [0, 1]
    lay = pm.layout(x)
    for i in ref:
        assert got[i].shape == (2, 2, lay.num_tokens, lay.num_tokens)
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[i].sum(-1), torch.ones(2, 2, lay.num_tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layout(family, hw):
    repo, pm = family
    lay = pm.layout(x_of(hw, batch=1))
    assert lay.prefix_kinds == FAMILIES[repo]
    assert lay.num_prefix == len(FAMILIES[repo])
    assert lay.grid == (hw[0] // 8, hw[1] // 8) and lay.patch_size == (8, 8)
    out = pm.forward(x_of(hw, batch=1))
    lay.check(out.last_hidden_state.shape[1])


def test_sizes_are_floored():
    pm = tiny("facebook/dino-vits16")
    x = x_of((47, 41), batch=1)
    lay = pm.layout(x)
    assert lay.grid == (5, 5)
    lay.check(pm.forward(x).last_hidden_state.shape[1])


def test_tap_leaves_outputs_unchanged(family):
    repo, pm = family
    x = x_of((48, 40))
    plain = pm.forward(x).last_hidden_state
    with pm.adapter.tap(pk.adapter.CollectSink(attention=True, hidden=True)):
        tapped = pm.forward(x).last_hidden_state
    torch.testing.assert_close(tapped, plain, atol=0, rtol=0)
    assert pm.model.config._attn_implementation == ATTN_IMPLEMENTATION


def test_hidden_tap_equals_output_hidden_states(family):
    repo, pm = family
    x = x_of((48, 40))
    got = pm.hidden_states(x)
    with torch.inference_mode():
        ref = pm.model(x, output_hidden_states=True, **pm.adapter._kwargs(x)).hidden_states
    assert len(ref) == pm.num_layers + 1  # embeddings, then each block
    for i in range(pm.num_layers):
        torch.testing.assert_close(got[i], ref[i + 1], atol=1e-6, rtol=0)


def test_layers_subset_only_reports_those():
    pm = tiny("facebook/dino-vits16", num_hidden_layers=3)
    got = pm.attention(x_of((32, 32)), layers=[1])
    assert list(got) == [1]


def test_mae_keeps_every_token_in_original_order():
    pm = tiny("facebook/vit-mae-base")
    model = pm.model
    x = x_of((48, 40))
    seen = {}
    hook = model.embeddings.register_forward_hook(lambda m, a, out: seen.update(emb=out[0]))
    out = pm.forward(x)
    hook.remove()
    emb = model.embeddings
    patches = emb.patch_embeddings(x)  # raster order
    pos = emb.interpolate_pos_encoding(patches, 48, 40)
    expected = torch.cat([(emb.cls_token + pos[:, :1]).expand(2, -1, -1), patches + pos[:, 1:]], 1)
    torch.testing.assert_close(seen["emb"], expected, atol=1e-6, rtol=0)
    assert torch.equal(out.ids_restore[0], torch.arange(30)) and not out.mask.any()
    # the trap this guards against: the library's own forward shuffles even at mask_ratio 0
    torch.manual_seed(0)
    assert not torch.equal(model(x, interpolate_pos_encoding=True).ids_restore[0], torch.arange(30))


def test_beit_bias_reaches_the_tap():
    pm = tiny("microsoft/beit-base-patch16-224")
    table = pm.model.layers[0].relative_position_bias.relative_position_bias_table
    assert table.abs().min() > 0  # randomized
    x = x_of((32, 32))
    before = pm.attention(x)[0]
    with torch.no_grad():
        table.add_(5 * torch.randn_like(table))
    after, ref = pm.attention(x)[0], pm.adapter.reference_attention(x)[0]
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=0)
    assert (after - before).abs().max() > 1e-2


def test_mad_through_probe_equals_reference_loop():
    pm = tiny("facebook/deit-base-distilled-patch16-224")
    x = x_of((48, 40), batch=3, seed=7)
    res = pk.probe(pm, x, metrics=["mad"], batch_size=2)
    ref = pm.adapter.reference_attention(x)
    gh, gw = 6, 5
    yx = np.array([(r * 8.0, c * 8.0) for r in range(gh) for c in range(gw)])
    d = np.sqrt(((yx[:, None, :] - yx[None, :, :]) ** 2).sum(-1))
    table = res.table.sort_values(["image", "layer", "head"])
    for layer, probs in ref.items():
        a = probs.double().numpy()[:, :, 2:, 2:]  # CLS and distillation token dropped, no renormalizing
        expected = (a * d).sum(-1).mean(-1)  # [B, H]
        rows = table[table.layer == layer]
        got = rows.value.to_numpy().reshape(3, 2)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_unknown_repo_lists_close_names():
    with pytest.raises(UnknownNameError) as info:
        pk.load("hf:facebook/dino-vits8", pretrained=False)
    assert "facebook/dino-vits16" in info.value.suggestions
    assert "hf download" in str(info.value)


def test_missing_weights_offline_say_how_to_fetch():
    from huggingface_hub import constants

    with pytest.raises(WeightsUnavailableError) as info:
        pk.load("hf:facebook/dino-vits16")
    msg = str(info.value)
    assert constants.HF_HUB_CACHE in msg and "hf download facebook/dino-vits16" in msg and "pretrained=False" in msg


def test_full_size_known_config_offline():
    pm = pk.load("hf:facebook/dino-vits16", pretrained=False, config={"num_hidden_layers": 1})
    assert (pm.num_heads, pm.model.config.hidden_size) == (6, 384)
    assert pm.layout(pm.example_input()).describe() == "1 prefix (cls) + 14x14 patches of 16x16 px = 197 tokens"


def test_local_directory_and_checkpoint_round_trip(tmp_path):
    cfg = transformers.ViTConfig(**TINY, num_labels=3)
    cls_model = transformers.ViTForImageClassification(cfg).eval()
    randomize(cls_model)
    cls_model.save_pretrained(tmp_path / "dir")
    x = x_of((32, 32))
    with torch.inference_mode():
        expected = cls_model.vit(x).last_hidden_state
    from_dir = pk.load(f"hf:{tmp_path / 'dir'}")
    torch.testing.assert_close(from_dir.forward(x).last_hidden_state, expected, atol=1e-6, rtol=0)
    from_file = pk.load("hf:google/vit-base-patch16-224", checkpoint=str(tmp_path / "dir" / "model.safetensors"),
                        config=TINY)
    torch.testing.assert_close(from_file.forward(x).last_hidden_state, expected, atol=1e-6, rtol=0)


def test_wrap_head_models_without_touching_their_config():
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)).eval()
    assert TransformersAdapter.can_wrap(vit)
    pm = pk.wrap(vit)
    assert pm.adapter.name == "hf" and isinstance(pm.model, transformers.ViTModel)
    assert vit.config._attn_implementation != ATTN_IMPLEMENTATION  # the user's config object is untouched
    x = x_of((32, 32))
    torch.testing.assert_close(pm.attention(x)[1], pm.adapter.reference_attention(x)[1], atol=1e-5, rtol=0)

    clip_cfg = transformers.CLIPConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "intermediate_size": 64},
                                       vision_config=TINY)
    clip = transformers.CLIPModel(clip_cfg).eval()
    pm = pk.wrap(clip)
    assert isinstance(pm.model, transformers.CLIPVisionModel) and pm.num_layers == 2
    assert not TransformersAdapter.can_wrap(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("repo", list(FAMILIES))
def test_preprocess_gives_native_tensor(repo):
    from PIL import Image

    pm = pk.load(f"hf:{repo}", pretrained=False, config={**TINY, "num_hidden_layers": 1})
    im = Image.new("RGB", (50, 37), (200, 10, 90))
    t = pm.preprocess(im)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 32, 32)
    assert pm.adapter.info["image_size"] == (32, 32)
