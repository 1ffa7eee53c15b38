"""Image sources: folders, files, PIL images, preprocessed tensors, the bundled sample set.

I/O stays apart from the maths: an :class:`ImageSet` lists what will be probed (names
first, so errors come before any long work), and :meth:`ImageSet.dataset` decodes and
preprocesses with each model's own transform, in DataLoader workers when asked.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .fileid import file_digest

__all__ = ["ImageSet", "resolve_images", "sample_images", "IMAGE_SUFFIXES", "SAMPLE"]

log = logging.getLogger("probekit.images")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SAMPLE = "sample"  # the name that selects the bundled sample set


def sample_images() -> list[Path]:
    """The bundled, license-clean sample photos (see probekit/data/samples/LICENSE.md)."""
    root = resources.files("probekit").joinpath("data", "samples")
    return sorted(Path(str(p)) for p in root.iterdir() if Path(str(p)).suffix.lower() in IMAGE_SUFFIXES)


def _readable(path: Path) -> str | None:
    """None if ``path`` opens as an image, else the reason it does not."""
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def to_rgb(im: Image.Image) -> Image.Image:
    """Upright RGB: the EXIF orientation applied (phone photos), then grayscale, palette and RGBA
    converted (alpha dropped, as PIL's convert does)."""
    im = ImageOps.exif_transpose(im)
    return im if im.mode == "RGB" else im.convert("RGB")


@dataclass
class ImageSet:
    """What will be probed: named images from files, PIL images or one preprocessed tensor."""

    names: list[str]
    paths: list[Path] | None = None
    pil: list[Image.Image] | None = None
    tensor: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.names)

    def fingerprint(self) -> str:
        """A hash of the image set (names, and file contents, pixels or tensor bytes), for caching.

        Computed once per set: it reads every file, and a comparison asks for it per model.
        File contents are hashed whole, whatever their size: a same-size replacement must not
        be served the old file's values.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        if self.tensor is not None:
            h.update(self.tensor.detach().cpu().contiguous().numpy().tobytes())
        for i, name in enumerate(self.names):
            h.update(name.encode())
            if self.pil is not None:  # in-memory images are named image0, image1...: hash their pixels
                im = self.pil[i]
                h.update(f"{im.mode}{im.size}".encode())
                h.update(hashlib.sha256(im.tobytes()).digest())
            if self.paths is not None:  # every byte of every file, large ones too (see probekit.fileid)
                h.update(file_digest(self.paths[i]).encode())
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(
            names=[self.names[i] for i in indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            pil=None if self.pil is None else [self.pil[i] for i in indices],
            tensor=None if self.tensor is None else self.tensor[list(indices)],
            skipped=list(self.skipped),
        )

    def dataset(self, transform: Callable[[Image.Image], torch.Tensor] | None) -> torch.utils.data.Dataset:
        """A dataset of ``(index, pixel_values)``, preprocessed by ``transform``."""
        return _Images(self, transform)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        s = self.images
        if s.tensor is not None:
            return i, s.tensor[i]
        if self.transform is None:
            raise ImageError("This model has no preprocessing; pass a preprocessed [N, 3, H, W] tensor.")
        if s.pil is not None:
            im = s.pil[i]
        else:
            try:
                with Image.open(s.paths[i]) as f:
                    im = f.copy()
            except (OSError, UnidentifiedImageError) as exc:
                raise ImageError(f"Cannot decode image {s.paths[i]}: {exc}. Remove it or fix it.") from exc
        x = self.transform(to_rgb(im))
        return i, torch.as_tensor(x)


def _from_paths(paths: list[Path], root: Path | None, strict: bool) -> ImageSet:
    keep, names, skipped = [], [], []
    for p in paths:
        name = str(p.relative_to(root)) if root is not None else str(p)
        reason = _readable(p)
        if reason is None:
            keep.append(p)
            names.append(name)
        elif strict:
            raise ImageError(f"{p} is not a readable image ({reason}). Remove it, or drop --strict to skip it.")
        else:
            skipped.append((name, reason))
    if skipped:
        log.warning(
            "Skipped %d unreadable file(s): %s", len(skipped), ", ".join(n for n, _ in skipped)
        )
    return ImageSet(names=names, paths=keep, skipped=skipped)


def resolve_images(
    images: Any, *, strict: bool = False, count: int | None = None, seed: int = 0
) -> ImageSet:
    """Turn what a user passes into an :class:`ImageSet`.

    Args:
        images: ``"sample"`` (the bundled set), a folder (searched recursively), an image file,
            a list of files/folders, PIL images, or a preprocessed ``[N, 3, H, W]`` tensor.
        strict: stop at the first unreadable file instead of skipping it with a warning.
        count, seed: a seeded random subset of ``count`` images.

    Raises:
        ImageError: a missing path, an empty set, or (``strict``) an unreadable file.
    """
    if isinstance(images, ImageSet):
        out = images
    elif isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ImageError(
                f"A tensor of images must be [N, 3, H, W] (preprocessed); got shape {tuple(images.shape)}."
            )
        out = ImageSet(names=[str(i) for i in range(images.shape[0])], tensor=images)
    elif isinstance(images, Image.Image):
        out = ImageSet(names=["image0"], pil=[images])
    elif isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        out = ImageSet(names=[f"image{i}" for i in range(len(images))], pil=list(images))
    else:
        items = [images] if isinstance(images, (str, os.PathLike)) else list(images or [])
        if not items:
            raise ImageError("No images given. Pass a folder, files, or 'sample' for the bundled set.")
        parts = []
        for item in items:
            if str(item) == SAMPLE:
                parts.append(_from_paths(sample_images(), None, strict))
                parts[-1].names = [p.name for p in parts[-1].paths]
                continue
            p = Path(item).expanduser()
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
                others = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() not in IMAGE_SUFFIXES)
                part = _from_paths(files, p, strict)
                part.skipped += [(str(f.relative_to(p)), "not an image suffix") for f in others]
                if others:
                    log.warning("Ignored %d non-image file(s) in %s", len(others), p)
                parts.append(part)
            elif p.is_file():
                parts.append(_from_paths([p], None, strict))
            else:
                raise ImageError(f"No such file or folder: {p}. Check the path, or use 'sample'.")
        out = ImageSet(
            names=[n for s in parts for n in s.names],
            paths=[q for s in parts for q in s.paths],
            skipped=[k for s in parts for k in s.skipped],
        )
    if len(out) == 0:
        skipped = f" ({len(out.skipped)} unreadable file(s) skipped)" if out.skipped else ""
        raise ImageError(f"The image set is empty{skipped}. Point --images at a folder with images.")
    if count is not None and count < len(out):
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(len(out), generator=g)[:count].tolist())
        out = out.subset(idx)
    return out
