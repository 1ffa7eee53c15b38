"""The kit's preprocessing checks: an adapter's ``preprocess`` against what it declares (size, channels,
``image_mean``/``image_std``: a constant image at the mean maps to zero; an upright ramp stays upright),
and the built-in libraries' adapters against the library's own transform for the model. Each mistake
fails with a message that names it; the correct transforms pass.
"""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms as T

import probekit as pk
from probekit.testing import check_adapter, randomize_parameters
from probekit.testing.preprocessing import check_preprocess, check_preprocess_matches_library

MNIST = (0.1307,), (0.3081,)  # what the example TinyViT declares (trained on MNIST)


def _tinyvit(steps: list | None = None):
    """The guide's example adapter on a small TinyViT; ``steps``: its transform after ToTensor instead of
    Normalize(MNIST statistics)."""
    from probekit_tinyvit import TinyViT, TinyVitAdapter

    ad = TinyVitAdapter.from_module(randomize_parameters(TinyViT(dim=32, depth=2, heads=2, mlp_dim=64).eval()))
    if steps is not None:
        ad.preprocess = T.Compose([T.Grayscale(1), T.Resize(28), T.CenterCrop(28), T.ToTensor(), *steps])
    return ad


def test_the_example_passes():
    said = check_preprocess("tinyvit", _tinyvit())
    assert said.startswith("1x28x28; a constant image at the declared mean maps to")


def test_imagenet_statistics_on_an_mnist_model_fail_the_kit():
    records = {r.check: r for r in check_adapter(_tinyvit([T.Normalize([0.485], [0.229])]), on_fail=None)}
    failed = {c: r.reason for c, r in records.items() if r.status == "failed"}
    assert set(failed) == {"check_preprocess"}, failed  # the attention checks feed tensors: only this one sees it
    assert ("preprocess maps a constant image at the declared mean (0.1307) to (-1.553), not 0 (declared std "
            "(0.3081)): it normalises with ImageNet statistics (mean (0.485), std (0.229))") in failed["check_preprocess"]


@pytest.mark.parametrize("steps, words", [
    ([], "it does not normalise (each constant image comes out as its pixel value): add Normalize(image_mean, "
         "image_std)"),
    ([T.Lambda(lambda x: 1 - x), T.Normalize(*MNIST)], "it inverts the image (a brighter image comes out lower)"),
    ([T.Normalize((0.1307,), (0.5,))], "it normalises with mean (0.1307) and std (0.5) (read off two constant "
                                       "images), not the declared ones"),
    ([T.Normalize(*MNIST), T.RandomVerticalFlip(1.0)], "does not keep the image upright: it flips the image upside "
                                                      "down"),
    ([T.Normalize(*MNIST), T.RandomHorizontalFlip(1.0)], "it mirrors the image left to right"),
    ([T.Normalize(*MNIST), T.Lambda(lambda x: x.transpose(-1, -2))], "it transposes the image"),
    ([T.Resize(32), T.Normalize(*MNIST)], "preprocess makes a 1x32x32 tensor of an image, the model takes 1x28x28 "
                                         "(in_chans x default_image_size)"),
])
def test_each_preprocessing_mistake_is_named(steps, words):
    with pytest.raises(AssertionError) as err:
        check_preprocess("tinyvit", _tinyvit(steps))
    assert words in str(err.value), str(err.value)


def test_undeclared_statistics_and_no_preprocess_fail():
    ad = _tinyvit()
    ad.image_mean = None
    with pytest.raises(AssertionError, match="does not declare image_mean and image_std"):
        check_preprocess("tinyvit", ad)
    ad = _tinyvit()
    ad.preprocess = None
    failed = {r.check: r for r in check_adapter(ad, on_fail=None) if r.status == "failed"}
    assert "could not run" in failed["check_preprocess"].reason  # a check that cannot run is a failure


# -- against the library's own transform ------------------------------------------------------------
def _timm():
    import timm

    m = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                         num_heads=2, num_classes=0)
    return pk.wrap(m.eval())


def test_timm_adapter_matches_create_transform_and_a_changed_interpolation_fails():
    from timm.data import create_transform, resolve_data_config

    pm = _timm()
    said = check_preprocess_matches_library("timm", pm)
    assert said.startswith("matches timm.data.create_transform(**resolve_data_config(model))")
    cfg = {**resolve_data_config(model=pm.model), "input_size": (3, 32, 32), "interpolation": "bilinear"}
    pm.adapter.preprocess = create_transform(**cfg)
    assert check_preprocess("timm", pm)  # the statistics and size are right: only the library's transform sees it
    with pytest.raises(AssertionError, match="preprocess differs from timm.data.create_transform"):
        check_preprocess_matches_library("timm", pm)


def test_open_clip_adapter_matches_its_preprocess_and_imagenet_statistics_fail():
    import open_clip as oc

    vision = dict(layers=2, width=32, head_width=16, image_size=32, patch_size=8, mlp_ratio=2)
    clip = oc.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=dict(context_length=8, vocab_size=64, width=32,
                                                                        heads=2, layers=1))
    pm = pk.wrap(clip.visual.eval())
    assert "open_clip's image_transform_v2" in check_preprocess_matches_library("clip", pm)
    assert check_preprocess("clip", pm)
    pm.adapter.preprocess = oc.image_transform(32, is_train=False, mean=(0.485, 0.456, 0.406),
                                               std=(0.229, 0.224, 0.225))
    with pytest.raises(AssertionError, match="it normalises with ImageNet statistics"):
        check_preprocess("clip", pm)
    with pytest.raises(AssertionError, match="preprocess differs from open_clip's"):
        check_preprocess_matches_library("clip", pm)


def test_transformers_adapter_matches_the_repos_processor(tmp_path):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.3, 0.4, 0.5],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path)
    pm = pk.load(f"hf:{tmp_path}")
    assert pm.adapter.image_mean == (0.3, 0.4, 0.5)  # declared from the processor
    assert check_preprocess("vit", pm)
    assert f"AutoImageProcessor.from_pretrained('{tmp_path}')" in check_preprocess_matches_library("vit", pm)
    pm.adapter.preprocess.processor.resample = 0  # nearest instead of the repo's bilinear
    with pytest.raises(AssertionError, match="preprocess differs from AutoImageProcessor"):
        check_preprocess_matches_library("vit", pm)
    # built from a config, the model has no processor of the library's: declared, with why, never a silent skip
    built = pk.wrap(transformers.ViTModel(cfg, add_pooling_layer=False).eval())
    why = built.adapter.not_applicable_checks["check_preprocess_matches_library"]
    assert why.startswith("no image processor files where the model was loaded from")
    assert torch.is_tensor(built.preprocess(__import__("PIL.Image").Image.new("RGB", (40, 50))))
