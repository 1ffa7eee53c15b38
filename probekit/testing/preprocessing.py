"""Preprocessing checks: the adapter's ``preprocess`` (what the engine applies to every image) against
what the adapter declares (``in_chans``, ``default_image_size``, ``image_mean``, ``image_std``) and,
for the libraries probekit ships adapters for, against the library's own transform for the model.

Why images with known answers. A model sees what its preprocessing makes of an image: statistics it
was not trained with (ImageNet's on an MNIST model), none at all, or an inverted or flipped image
change every number it produces, and no attention check can see it (the kit feeds tensors). Resizing
and cropping keep a constant image constant, so a constant image at the declared mean must come out
as zero, and one at another grey level as ``(value - mean) / std``: two levels give the mean and std
the transform really uses. A brightness ramp must come out rising the same way (not flipped, not
transposed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from probekit.inputs.images import per_channel, to_channels
from probekit.testing.records import SkipCheck
from probekit.testing.tapping import adapter_of

__all__ = ["check_preprocess", "check_preprocess_matches_library", "library_transform", "LIBRARIES"]

#: statistics a transform may use by mistake, named in the diagnosis
KNOWN_STATS = {
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "OpenAI CLIP": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "0.5 / 0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
LIBRARY_ATOL = 1e-5  # the same library transform twice agrees exactly


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _declared(name: str, ad) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = getattr(ad, "image_mean", None), getattr(ad, "image_std", None)
    assert mean is not None and std is not None, (
        f"{name}: {type(ad).__name__} does not declare image_mean and image_std, the per-channel statistics (of "
        "pixels in [0, 1]) its preprocess normalises with, the ones the model was trained with: set them on the "
        "adapter (0 and 1 for a model trained on raw [0, 1] pixels).")
    c = ad.in_chans
    mean, std = per_channel(mean, c), per_channel(std, c)
    assert min(std) > 0, f"{name}: image_std {_fmt(std)} must be positive"
    return mean, std


def _image(pixels: np.ndarray, channels: int) -> Image.Image:
    """A PIL image of uint8 ``[H, W, C]`` pixels in the mode the engine hands a ``channels`` model."""
    arr = pixels[..., 0] if channels == 1 else pixels
    return to_channels(Image.fromarray(np.ascontiguousarray(arr)), channels)


def _apply(name: str, transform: Callable, im: Image.Image, what: str = "preprocess") -> torch.Tensor:
    out = torch.as_tensor(transform(im))
    assert out.is_floating_point(), f"{name}: {what} returned {out.dtype}, not a float tensor"
    return out.float().cpu()


def _size(ad) -> tuple[int, int, int]:
    h, w = ad.default_image_size
    return ad.in_chans, int(h), int(w)


def _levels(mean) -> tuple[np.ndarray, np.ndarray]:
    """Two grey levels per channel (uint8): the declared mean, and one 64 levels away from it."""
    at = np.array([round(m * 255) for m in mean]).clip(0, 255)
    return at.astype(np.uint8), np.where(at < 128, at + 64, at - 64).astype(np.uint8)


def _normalisation_words(mean, std, levels, outs) -> str:
    """What normalisation two constant images say the transform applies, in words."""
    (v1, v2), (o1, o2) = [lv / 255.0 for lv in levels], outs
    if np.allclose(o1, v1, atol=2 / 255) and np.allclose(o2, v2, atol=2 / 255):
        return ("it does not normalise (each constant image comes out as its pixel value): add "
                "Normalize(image_mean, image_std) after ToTensor")
    slope = (o2 - o1) / (v2 - v1)  # 1 / std'
    if (slope < 0).any():
        return "it inverts the image (a brighter image comes out lower): drop the inversion"
    got_std = 1 / slope
    got_mean = v1 - o1 * got_std
    for label, (m3, s3) in KNOWN_STATS.items():
        # a grayscale model: any one channel's statistics, or their mean
        options = [(m3, s3)] if len(mean) == 3 else [((a,), (b,)) for a, b in zip(m3, s3, strict=True)] + [
            (per_channel(m3, 1), per_channel(s3, 1))]
        for m, s in options:
            m, s = per_channel(m, len(mean)), per_channel(s, len(mean))
            if np.allclose(got_mean, m, atol=0.01) and np.allclose(got_std, s, atol=0.01):
                return (f"it normalises with {label} statistics (mean {_fmt(m)}, std {_fmt(s)}), not the declared "
                        "ones: use the statistics the model was trained with, and declare those")
    return (f"it normalises with mean {_fmt(got_mean)} and std {_fmt(got_std)} (read off two constant images), not "
            "the declared ones")


def _orientation_words(name: str, ad) -> str | None:
    """Words for a transform that flips or transposes a brightness ramp, else None."""
    c, h, w = _size(ad)
    ramp = np.linspace(30, 220, 2 * h)[:, None].repeat(2 * w, 1)
    seen = {}
    for axis, img in (("down", ramp), ("right", np.linspace(30, 220, 2 * w)[None, :].repeat(2 * h, 0))):
        out = _apply(name, ad.preprocess, _image(img.round().astype(np.uint8)[..., None].repeat(c, -1), c)).mean(0)
        rows, cols = out.mean(1), out.mean(0)
        along, across = (rows, cols) if axis == "down" else (cols, rows)
        corr = np.corrcoef(along.numpy(), np.arange(len(along)))[0, 1] if along.std() > 1e-6 else 0.0
        seen[axis] = (corr, across.std().item() > along.std().item())
    (down, swapped_d), (right, swapped_r) = seen["down"], seen["right"]
    if swapped_d and swapped_r:
        return "it transposes the image (rows come out as columns)"
    if down < -0.9:
        return "it flips the image upside down"
    if right < -0.9:
        return "it mirrors the image left to right"
    if down < 0.9 or right < 0.9:
        return f"a brightness ramp does not come out rising the same way (correlations {down:.2f}, {right:.2f})"
    return None


def check_preprocess(name: str, pm) -> str:
    # The model sees what preprocess makes of an image: the size and channels it takes, normalised with
    # the statistics it was trained with (the adapter's image_mean and image_std), upright. Called as the
    # engine calls it, on images whose right output the declarations give (module docstring).
    ad = adapter_of(pm)
    if ad.preprocess is None:
        raise SkipCheck(f"{name}: the adapter has no preprocess, so images cannot be probed (only tensors): build "
                        "the transform the model was trained with (resize, crop, ToTensor, Normalize)")
    mean, std = _declared(name, ad)
    c, h, w = _size(ad)
    levels = _levels(mean)
    outs = []
    for level in levels:
        out = _apply(name, ad.preprocess, _image(np.broadcast_to(level, (2 * h, 2 * w, c)).copy(), c))
        assert tuple(out.shape) == (c, h, w), (
            f"{name}: preprocess makes a {'x'.join(map(str, out.shape))} tensor of an image, the model takes "
            f"{c}x{h}x{w} (in_chans x default_image_size)")
        outs.append(out.flatten(1).mean(1).numpy())
    want = [(lv / 255.0 - np.array(mean)) / np.array(std) for lv in levels]
    tol = 2.5 / 255 / min(std)  # 8-bit levels, resampling rounding
    if not all(np.allclose(o, v, atol=tol) for o, v in zip(outs, want, strict=True)):
        raise AssertionError(
            f"{name}: preprocess maps a constant image at the declared mean {_fmt(mean)} to {_fmt(outs[0])}, not 0 "
            f"(declared std {_fmt(std)}): " + _normalisation_words(mean, std, levels, outs) + ".")
    turned = _orientation_words(name, ad)
    assert turned is None, f"{name}: preprocess does not keep the image upright: {turned}."
    return (f"{c}x{h}x{w}; a constant image at the declared mean maps to {np.abs(outs[0]).max():.2g} (0 up to 8-bit "
            "rounding), the declared std scales, a ramp stays upright")


# -- the libraries' own transforms ----------------------------------------------------------------
def _timm(ad) -> tuple[Callable, str]:
    from timm.data import create_transform, resolve_data_config

    c, h, w = _size(ad)
    cfg = resolve_data_config(model=ad.model)
    cfg.update(input_size=(c, h, w), mean=per_channel(cfg["mean"], c), std=per_channel(cfg["std"], c))
    return create_transform(**cfg, is_training=False), "timm.data.create_transform(**resolve_data_config(model))"


def _open_clip(ad) -> tuple[Callable, str]:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    visual = ad.model
    cfg = {**dataclasses.asdict(PreprocessCfg()), "size": visual.image_size,
           **dict(getattr(visual, "preprocess_cfg", None) or {})}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False), "open_clip's image_transform_v2(preprocess_cfg)"


def _transformers(ad) -> tuple[Callable, str]:
    from transformers import AutoImageProcessor

    source = ad.info.get("processor")
    if source is None:
        raise SkipCheck("transformers has no image processor for this model (no preprocessor_config.json where it "
                        "was loaded from): nothing of the library's to compare preprocess with")
    proc = AutoImageProcessor.from_pretrained(source, local_files_only=True)
    return (lambda im: proc(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0],
            f"AutoImageProcessor.from_pretrained({source!r})")


#: library -> the library's own inference transform for an adapter's model, with its words
LIBRARIES: dict[str, Callable] = {"timm": _timm, "open_clip": _open_clip, "transformers": _transformers}


def library_transform(ad) -> tuple[Callable, str]:
    """``(transform, words)``: the library's own inference transform for ``ad``'s model."""
    return LIBRARIES[ad.library](ad)


def check_preprocess_matches_library(name: str, pm) -> str:
    # An adapter of timm, transformers or open_clip models preprocesses as the library itself would
    # for that model (its resize, crop, interpolation and statistics): a non-square photo-like image
    # goes through both, and they must agree.
    ad = adapter_of(pm)
    if ad.preprocess is None:
        raise SkipCheck(f"{name}: the adapter has no preprocess to compare with {ad.library}'s")
    try:
        transform, source = library_transform(ad)
    except SkipCheck as exc:
        raise SkipCheck(f"{name}: {exc}") from None
    c, h, w = _size(ad)
    g = np.random.default_rng(0)
    coarse = torch.from_numpy(g.uniform(20, 235, (1, c, 5, 7)))
    smooth = torch.nn.functional.interpolate(coarse, size=(h + h // 3 + 3, w + w // 2 + 5), mode="bicubic")
    im = _image(smooth[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy(), c)
    got, want = _apply(name, ad.preprocess, im), _apply(name, transform, im, source)
    assert got.shape == want.shape, f"{name}: preprocess makes {tuple(got.shape)}, {source} {tuple(want.shape)}"
    dev = (got - want).abs().max().item()
    assert dev <= LIBRARY_ATOL, (f"{name}: preprocess differs from {source} by {dev:.3g} on a "
                                 f"{im.height}x{im.width} image: preprocess as the library does for this model")
    return f"matches {source} (max difference {dev:.1e})"
