"""Input channels come from the adapter (``in_chans``): images are converted to them, tensors with
another count are refused with a clear error, and built-in adapters read the count from the model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import probekit as pk
from probekit.errors import ImageError
from probekit.inputs.images import per_channel, to_channels


def test_to_channels_converts_modes_and_keeps_exif():
    rgb = Image.new("RGB", (4, 2), (200, 100, 50))
    gray = to_channels(rgb, 1)
    assert gray.mode == "L" and gray.getpixel((0, 0)) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert to_channels(Image.new("RGBA", (2, 2), (10, 20, 30, 0)), 1).mode == "L"
    assert to_channels(Image.new("L", (2, 2), 7), 3).getpixel((0, 0)) == (7, 7, 7)
    assert to_channels(Image.new("P", (2, 2)), 4).mode == "RGBA"
    rotated = Image.new("L", (4, 2))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90: a 4x2 image is shown 2x4
    rotated.info["exif"] = exif.tobytes()
    assert to_channels(rotated, 1).size == (2, 4)
    with pytest.raises(ImageError, match="2-channel inputs"):
        to_channels(rgb, 2)
    assert per_channel((0.485, 0.456, 0.406), 1) == pytest.approx((0.449,))
    assert per_channel((0.5, 0.5, 0.5), 3) == (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def gray_vit():
    import timm
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return pk.wrap(m.eval())


def test_grayscale_model_reads_any_pil_mode(gray_vit):
    pm = gray_vit
    assert pm.adapter.in_chans == 1 and pm.example_input().shape[1] == 1
    luma = round(0.299 * 200 + 0.587 * 30 + 0.114 * 30)  # what RGB (200, 30, 30) becomes in mode L
    ims = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGBA", (40, 40), (200, 30, 30, 255)),
           Image.new("L", (40, 40), luma)]
    res = pk.probe(pm, ims, metrics=["mad"], batch_size=3)
    values = res.table.pivot_table(index=["layer", "head"], columns="image", values="value")
    # the same gray level whatever the mode: identical values
    assert torch.allclose(torch.tensor(values.to_numpy()), torch.tensor(values["image2"].to_numpy())[:, None])


def test_tensor_with_wrong_channel_count_is_refused(gray_vit):
    with pytest.raises(ImageError, match=r"has 3 channels .* model takes 1 \(its adapter's in_chans\)"):
        pk.probe(gray_vit, torch.randn(2, 3, 32, 32), metrics=["mad"])
    res = pk.probe(gray_vit, torch.randn(2, 1, 32, 32), metrics=["mad"])
    assert len(res.table) == 2 * 2 * 2


def test_builtin_adapters_read_channels_from_the_model(tmp_path):
    import transformers as tr
    cfg = tr.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_channels=1)
    assert pk.wrap(tr.ViTModel(cfg, add_pooling_layer=False)).adapter.in_chans == 1
    import open_clip as oc
    vision = dict(layers=1, width=32, head_width=16, image_size=32, patch_size=8, mlp_ratio=2)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    assert pk.wrap(oc.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).visual).adapter.in_chans == 3
