"""pk.wrap: a user's own module gets the adapter that understands it, or a clear refusal."""

from __future__ import annotations

import pytest
import torch

import probekit as pk
from probekit.errors import UnsupportedArchitectureError


def test_wrap_timm_vision_transformer():
    import timm
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    pm = pk.wrap(m, label="mine")
    assert pm.adapter.name == "timm" and pm.label == "mine"
    assert (pm.num_layers, pm.num_heads) == (2, 2)
    x = torch.randn(1, 3, 32, 32)
    assert pm.layout(x).num_tokens == 17 == pm.attention(x)[1].shape[-1]


def test_wrap_transformers_vit_model():
    import transformers as tr
    cfg = tr.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    pm = pk.wrap(tr.ViTModel(cfg))
    assert pm.adapter.name == "hf"
    assert (pm.num_layers, pm.num_heads) == (2, 2)
    x = torch.randn(1, 3, 32, 32)
    assert pm.layout(x).num_tokens == 17 == pm.attention(x)[0].shape[-1]


def test_wrap_onnx_model_proto(tmp_path):
    import onnx
    import onnxruntime  # noqa: F401  (a [test] dependency: missing is a failure)
    import timm
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17)
    pm = pk.wrap(onnx.load(str(tmp_path / "m.onnx")))
    assert pm.adapter.name == "onnx" and pm.num_layers == 2


def test_wrap_unknown_module_names_the_contract():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(UnsupportedArchitectureError) as info:
        pk.wrap(cnn)
    msg = str(info.value)
    assert "torch.nn.modules.container.Sequential" in msg
    for word in ("probekit.Adapter", "can_wrap", "from_module", "probekit.adapters", "check_adapter"):
        assert word in msg, word
    for name in pk.adapters.names():  # every registered adapter was asked (or said it failed to load)
        assert name in msg
