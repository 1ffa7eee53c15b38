"""The same weights give the same attention, whichever library runs them.

- timm VisionTransformer <-> transformers ViTModel (weights converted here by hand; layer-norm
  eps set to timm's 1e-6, since transformers defaults to 1e-12).
- open_clip VisionTransformer <-> timm VisionTransformer (CLIP layout: pre-norm, eps 1e-5).
- Every alias in configs/models.yaml builds at random init with the layout its entry promises.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import probekit as pk
from probekit.testing import randomize_parameters

TOL = 1e-5
D, LAYERS, HEADS, PATCH, SIZE = 32, 2, 2, 8, 32


# seeded noise on every parameter (biases, norms, layer scale, position tables): bugs that random
# init hides (zero biases, zero tables) then change the numbers
randomize = functools.partial(randomize_parameters, scale=0.2)


def _max_dev(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[i] - b[i]).abs().max().item() for i in a)


def _mad(pm: pk.ProbedModel, x: torch.Tensor) -> torch.Tensor:
    """[N, L, H] MAD values through the engine (the path users run)."""
    t = pk.probe(pm, x, metrics=["mad"], batch_size=len(x)).table.sort_values(["image", "layer", "head"])
    return torch.tensor(t["value"].to_numpy(), dtype=torch.float64).view(len(x), pm.num_layers, pm.num_heads)


# -- timm <-> transformers ---------------------------------------------------------------------------
def _timm_vit():
    import timm

    return randomize(timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=D, depth=LAYERS,
                                       num_heads=HEADS, patch_size=PATCH, img_size=SIZE, dynamic_img_size=True))


def _timm_to_hf(tm) -> torch.nn.Module:
    """A transformers ViTModel holding ``tm``'s weights (qkv split into q/k/v projections)."""
    import transformers

    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 intermediate_size=4 * D, image_size=SIZE, patch_size=PATCH, layer_norm_eps=1e-6,
                                 hidden_act="gelu", qkv_bias=True)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    src = tm.state_dict()
    sd = {
        "embeddings.cls_token": src["cls_token"],
        "embeddings.position_embeddings": src["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
        "layernorm.weight": src["norm.weight"],
        "layernorm.bias": src["norm.bias"],
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(LAYERS):
        for kind in ("weight", "bias"):
            for q, part in zip(("q_proj", "k_proj", "v_proj"), src[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                sd[f"layers.{i}.attention.{q}.{kind}"] = part
            for t, h in names.items():
                sd[f"layers.{i}.{h}.{kind}"] = src[f"blocks.{i}.{t}.{kind}"]
    hf.load_state_dict(sd, strict=True)
    return hf


def _hf_side(hf):
    """The hf adapter bound to ``hf`` (built in: a failure to load it is a failure here)."""
    return pk.ProbedModel(pk.adapters.get("hf").from_module(hf), spec="hf:<parity>")


def _hf_eager_attention(hf, x) -> dict[int, torch.Tensor]:
    eager = copy.deepcopy(hf)  # the copy's modules share one copied config: hf keeps SDPA
    eager.set_attn_implementation("eager")
    with torch.inference_mode():
        out = eager(pixel_values=x, output_attentions=True, interpolate_pos_encoding=True)
    assert out.attentions, "eager output_attentions came back empty"
    return {i: a.float() for i, a in enumerate(out.attentions)}


@pytest.mark.parametrize("size", [(32, 32), (48, 40)], ids=["native", "48x40"])
def test_timm_and_transformers_vit_agree(size, monkeypatch):
    if size != (SIZE, SIZE):
        # The libraries resample position embeddings differently: timm with antialiased bicubic
        # (PyTorch's a=-0.5 kernel), transformers with plain bicubic (a=-0.75); attention then
        # differs by ~7e-3 at 48x40. Give timm transformers' kernel to compare everything else.
        import functools

        import timm.models.vision_transformer as tvit

        monkeypatch.setattr(tvit, "resample_abs_pos_embed",
                            functools.partial(tvit.resample_abs_pos_embed, antialias=False))
    tm = _timm_vit()
    hf = _timm_to_hf(tm)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    pt = pk.ProbedModel(pk.adapters.get("timm").from_module(tm), spec="timm:<parity>")
    attn_timm = pt.attention(x)
    eager = _hf_eager_attention(hf, x)
    assert _max_dev(attn_timm, eager) < TOL  # timm tap vs transformers' own eager softmax
    ph = _hf_side(hf)
    assert ph.layout(x) == pt.layout(x)
    assert _max_dev(ph.attention(x), attn_timm) < TOL
    hid_t, hid_h = pt.hidden_states(x), ph.hidden_states(x)
    assert _max_dev(hid_t, hid_h) < 1e-4
    assert (_mad(pt, x) - _mad(ph, x)).abs().max() < TOL


# -- open_clip <-> timm -------------------------------------------------------------------------------
def _open_clip_tower():
    pm = pk.load("open_clip:ViT-B-16", pretrained=False, embed_dim=16,
                 vision_cfg=dict(image_size=SIZE, patch_size=PATCH, width=D, layers=LAYERS, head_width=D // HEADS),
                 text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    randomize(pm.model)
    return pm


def _open_clip_to_timm(visual) -> torch.nn.Module:
    """timm's CLIP layout (pre-norm, class token, LayerNorm eps 1e-5) with the tower's weights."""
    import timm

    tm = timm.create_model("vit_base_patch16_clip_224", pretrained=False, embed_dim=D, depth=LAYERS,
                           num_heads=HEADS, patch_size=PATCH, img_size=SIZE, num_classes=0).eval()
    src = visual.state_dict()
    sd = {
        "cls_token": src["class_embedding"].view(1, 1, D),
        "pos_embed": src["positional_embedding"].unsqueeze(0),
        "patch_embed.proj.weight": src["conv1.weight"],
        "norm_pre.weight": src["ln_pre.weight"], "norm_pre.bias": src["ln_pre.bias"],
        "norm.weight": src["ln_post.weight"], "norm.bias": src["ln_post.bias"],
    }
    names = {"ln_1": "norm1", "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        sd[f"blocks.{i}.attn.qkv.weight"] = src[p + "attn.in_proj_weight"]
        sd[f"blocks.{i}.attn.qkv.bias"] = src[p + "attn.in_proj_bias"]
        for o, t in names.items():
            for kind in ("weight", "bias"):
                sd[f"blocks.{i}.{t}.{kind}"] = src[p + f"{o}.{kind}"]
    tm.load_state_dict(sd, strict=True)
    return tm


def test_open_clip_tower_and_its_timm_conversion_agree():
    po = _open_clip_tower()
    tm = _open_clip_to_timm(po.model)
    pt = pk.ProbedModel(pk.adapters.get("timm").from_module(tm), spec="timm:<parity>")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    assert po.layout(x) == pt.layout(x)
    a_o = po.attention(x)
    assert _max_dev(a_o, po.adapter.reference_attention(x)) < TOL
    assert _max_dev(a_o, pt.attention(x)) < TOL
    assert _max_dev(a_o, pt.adapter.reference_attention(x)) < TOL
    assert _max_dev(po.hidden_states(x), pt.hidden_states(x)) < 1e-4
    assert (_mad(po, x) - _mad(pt, x)).abs().max() < TOL


# -- every alias builds --------------------------------------------------------------------------------
_PREFIX = {"siglip": 0, "deit-distilled": 2}


def _expected_prefix(name: str, entry: dict) -> int:
    if entry["family"] == "dinov2" and name.endswith("-reg"):
        return 5
    if entry["family"] == "deit" and "distilled" in name:
        return 2
    return _PREFIX.get(entry["family"], 1)


def _small(spec: str) -> dict:
    """Options that shrink a model to one block without changing its patch size or layout."""
    backend, _, name = spec.partition(":")
    if backend == "timm":
        staged = {"swin": {"depths": (1, 1, 1, 1)}, "twins": {"depths": (1, 1, 1, 1)}, "pit_": {"depth": (1, 1, 1)},
                  "mvitv2": {}, "hiera": {"stages": (1, 1, 1, 1)}}
        return next((v for k, v in staged.items() if k in name), {"depth": 1})
    if backend == "open_clip":
        import open_clip

        cfg = open_clip.get_model_config(name.split("/")[0])
        return {"vision_cfg": {**cfg["vision_cfg"], "layers": 1}, "text_cfg": {**cfg["text_cfg"], "layers": 1}}
    if "sam-vit" in name:  # one windowed block; the 64x64 grid and 16 px patches stay
        return {"config": {"num_hidden_layers": 1, "global_attn_indexes": []}}
    return {}


ALIASES = {k: v for k, v in pk.aliases().items() if v["spec"].split(":")[0] in ("timm", "open_clip", "hf")}
QUICK_ALIASES = {"deit-s", "clip-b16", "vit-b16-google"}  # one per library in the quick run; the rest are slow


@pytest.mark.parametrize("alias", [a if a in QUICK_ALIASES else pytest.param(a, marks=pytest.mark.slow)
                                   for a in sorted(ALIASES)])
def test_every_alias_builds_with_the_promised_layout(alias):
    entry = ALIASES[alias]
    assert entry["training"] in ("supervised", "self-supervised", "image-text")
    assert entry["weights"] and entry["family"]
    pm = pk.load(alias, pretrained=False, **_small(entry["spec"]))
    x = pm.example_input(1)
    lay = pm.layout(x)
    assert lay.patch_size == (entry["patch_size"],) * 2
    if not pm.adapter.global_attention:
        return
    assert lay.num_prefix == _expected_prefix(alias, entry)
    hidden = pm.hidden_states(x, layers=[0])
    assert hidden[0].shape[1] == lay.num_tokens
