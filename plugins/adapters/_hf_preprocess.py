"""Preprocessing through the family's own transformers image processor: the cached one of a
repo when there is one, else the family's processor class built from :data:`KNOWN` defaults."""

from __future__ import annotations

from typing import Any

import torch

from ._hf_families import Family, known_defaults

__all__ = ["_Preprocess", "processor_for", "cached_processor"]


class _Preprocess:
    """PIL RGB image -> ``[3, H, W]`` float tensor through a transformers image processor (picklable)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0].float()

    def __repr__(self) -> str:
        return f"_Preprocess({type(self.processor).__name__})"


def processor_for(fam: Family, size: tuple[int, int], repo: str | None) -> Any:
    """The family's processor class at ``size``, with a known repo's mean/std/crop (no files needed)."""
    import transformers

    opts: dict[str, Any] = dict(processor=fam.processor, norm=fam.norm, crop_ratio=fam.crop_ratio,
                                resample=fam.resample)
    opts.update(known_defaults(repo)[1])
    h, w = size
    kwargs: dict[str, Any] = dict(image_mean=list(opts["norm"][0]), image_std=list(opts["norm"][1]),
                                  resample=opts["resample"], do_resize=True, do_rescale=True, do_normalize=True)
    if fam.letterbox:  # longest edge to the size, then zeros at the bottom and right (SAM)
        kwargs.update(size={"longest_edge": max(h, w)}, pad_size={"height": h, "width": w}, do_pad=True)
    elif opts["crop_ratio"] is None:
        kwargs.update(size={"height": h, "width": w}, do_center_crop=False)
    else:
        kwargs.update(size={"shortest_edge": round(max(h, w) * opts["crop_ratio"])},
                      crop_size={"height": h, "width": w}, do_center_crop=True)
    return getattr(transformers, opts["processor"])(**kwargs)


def cached_processor(repo: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(repo, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None
