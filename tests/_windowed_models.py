"""Tiny random-init models of every family whose layers are not all global (imported by conftest.py
as ``probekit_tests_windowed``): timm Swin, SwinV2, the SAM/ViTDet encoder, PiT, CaiT, Twins and MViTv2,
and transformers' Swin, SwinV2 and SAM encoder, each with every parameter randomized so relative-position tables, logit
scales and biases count."""

from __future__ import annotations

import torch

import probekit as pk
from probekit.testing import randomize_parameters

_TWINS = dict(embed_dims=(16, 16, 32, 32), num_heads=(1, 2, 2, 2), depths=(2, 2, 2, 2), mlp_ratios=(1, 1, 1, 1))

# tiny configs: (spec, native build kwargs, another size)
FAMILIES = {
    "swin": ("timm:swin_tiny_patch4_window7_224",
             dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7, img_size=56), (48, 64)),
    "swinv2": ("timm:swinv2_tiny_window8_256",
               dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=32), (40, 24)),
    "sam": ("timm:samvit_base_patch16",
            dict(embed_dim=32, depth=3, num_heads=2, global_attn_indexes=(1,), window_size=3, img_size=64,
                 neck_chans=8), (80, 48)),
    "pit": ("timm:pit_ti_224", dict(depth=(1, 1, 1), heads=(1, 2, 2), base_dims=(16, 16, 16), img_size=64), (80, 48)),
    "cait": ("timm:cait_xxs24_224", dict(embed_dim=32, depth=2, num_heads=2, img_size=48, patch_size=16), (64, 32)),
    # 224 px: windows and sub-sampled keys divide every grid; 160x96: windows padded, keys 5x3
    "twins-svt": ("timm:twins_svt_small", dict(_TWINS, img_size=224), (160, 96)),
    "twins-pcpvt": ("timm:twins_pcpvt_small", dict(_TWINS, depths=(1, 1, 1, 1), img_size=224), (160, 96)),
}


def build(family: str, size=None, fused: bool = True, seed: int = 0) -> pk.ProbedModel:
    spec, kw = FAMILIES[family][:2]
    kw = dict(kw, img_size=size or kw["img_size"])
    pm = pk.load(spec, pretrained=False, **kw)
    randomize_parameters(pm.model, seed=seed, scale=0.2)
    for m in pm.model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return pm


def mvit(size=64, cls_token=False, seed=0) -> pk.ProbedModel:
    """A tiny MViTv2 (two stages; keys pooled by 4 then 2; queries pooled at the second stage)."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 2), embed_dim=16, num_heads=1, use_cls_token=cls_token,
                           stride_q=((1, 1), (2, 2)))
    torch.manual_seed(seed)
    model = MultiScaleVit(cfg, img_size=size, num_classes=0)
    randomize_parameters(model, seed=seed, scale=0.2)
    return pk.wrap(model)


def hf_swin(seed: int = 0) -> pk.ProbedModel:
    pm = pk.load("hf:microsoft/swin-tiny-patch4-window7-224", pretrained=False,
                 config=dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, image_size=32))
    randomize_parameters(pm.model, seed=seed, scale=0.2)
    return pm


def hf_swinv2(seed: int = 0) -> pk.ProbedModel:
    """transformers' SwinV2 (pads then rolls; logit scale and continuous position bias randomized)."""
    pm = pk.load("hf:microsoft/swinv2-tiny-patch4-window8-256", pretrained=False,
                 config=dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, image_size=32))
    randomize_parameters(pm.model, seed=seed, scale=0.2)
    return pm


def hf_sam_encoder(image_size: int = 80, seed: int = 0) -> pk.ProbedModel:
    """transformers' SAM vision encoder: windows of 3 tokens (80 px: a 5x5 grid padded to 6x6), block 1 global."""
    from transformers import SamVisionConfig, SamVisionModel

    cfg = SamVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, global_attn_indexes=[1],
                          window_size=3, output_channels=8, mlp_dim=64, image_size=image_size)
    torch.manual_seed(seed)
    return pk.wrap(randomize_parameters(SamVisionModel(cfg), seed=seed, scale=0.2))
