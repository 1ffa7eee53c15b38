"""Image sources: folders, files, PIL images, preprocessed tensors, the bundled sample set.

I/O stays apart from the maths: an :class:`ImageSet` lists what will be probed (names
first, so errors come before any long work), and :meth:`ImageSet.dataset` decodes and
preprocesses with each model's own transform, in DataLoader workers when asked.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from probekit._io.fileid import file_digest_head
from probekit.errors import ImageError
from probekit.inputs.memory import tame

__all__ = ["ImageSet", "resolve_images", "sample_images", "open_image", "to_channels", "to_rgb", "per_channel",
           "IMAGE_SUFFIXES", "SAMPLE"]

log = logging.getLogger("probekit.inputs.images")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SAMPLE = "sample"  # the name that selects the bundled sample set


def sample_images() -> list[Path]:
    """The bundled, license-clean sample photos (see probekit/data/samples/LICENSE.md)."""
    root = resources.files("probekit") / "data" / "samples"
    return sorted(Path(str(p)) for p in root.iterdir() if Path(str(p)).suffix.lower() in IMAGE_SUFFIXES)


NOT_AN_IMAGE = "not an image"  # how skipped files that are no image at all are recorded


def _readable(path: Path, decode: bool = False) -> str | None:
    """None if ``path`` opens as an image, else the reason it does not.

    ``decode``: decode the pixels too (``--strict``: a truncated JPEG passes ``verify`` and fails
    only when decoded, so strict runs decode every file before any model loads).

    A file PIL cannot identify is recorded as ``"not an image: ..."``, apart from images that
    are damaged or too large; an image over PIL's decompression-bomb limit is skipped with the
    way to allow it, never stopping the whole run.
    """
    try:
        with Image.open(path) as im:
            im.verify()
        if decode:
            with Image.open(path) as im:
                im.load()
        return None
    except UnidentifiedImageError:
        return f"{NOT_AN_IMAGE}: PIL cannot identify the file"
    except Image.DecompressionBombError as exc:
        return f"too large ({exc}); allow it with PIL.Image.MAX_IMAGE_PIXELS = None if you trust the file"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"


def display_name(path: str | os.PathLike[str]) -> str:
    """A file name that can be written anywhere (UTF-8 tables, JSON, hashes): bytes that are not
    UTF-8 (kept by Python as surrogates) are shown as ``\\xNN`` escapes, one name per file."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _writable(text: str) -> str:
    """``text`` if it encodes as UTF-8, else as :func:`display_name` writes it (any source's names)."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        try:
            return display_name(text)
        except UnicodeEncodeError:  # a surrogate that no file name decodes to
            return text.encode("utf-8", "backslashreplace").decode()


#: first bytes of the formats that can hold several frames: GIF, TIFF and BigTIFF, PNG (APNG),
#: WebP. JPEG is left out: an MPO's extra frames are a second view or a preview, not pages.
_MULTI_FRAME_MAGIC = (b"GIF8", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x89PNG", b"RIFF")
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _frames(head: bytes, source: Any) -> int:
    """How many frames an image whose first bytes are ``head`` holds; the engine probes the first
    (PIL's frame 0). Only formats that can hold more are opened, and only their headers are read."""
    if not head.startswith(_MULTI_FRAME_MAGIC):
        return 1
    try:
        with Image.open(source) as im:
            return int(getattr(im, "n_frames", 1))
    except _DECODE_ERRORS:
        return 1  # decoding will say what is wrong with it


def _content(where: Any) -> tuple[str, int]:
    """An image's identity (SHA-256 of its bytes) and frame count: a file, or a source's reference
    (``.read()``: a tar member's bytes, a dataset cell's). One that cannot be read gets an identity
    saying so (decoding then skips it, by name); it is never taken for another image."""
    try:
        if isinstance(where, (str, os.PathLike)):
            digest, head = file_digest_head(where)  # every byte, large files too (see probekit._io.fileid)
            return digest, _frames(head, where)
        data = where.read()
    except (OSError, ValueError) as exc:
        return f"unreadable: {type(exc).__name__}", 1
    if data is None:
        return "empty", 1
    return hashlib.sha256(data).hexdigest(), _frames(data[:16], io.BytesIO(data))


def _update(h: Any, text: str) -> None:
    """One field of a fingerprint, length-prefixed so that no two lists of fields hash alike."""
    data = text.encode()
    h.update(b"%d:" % len(data) + data)


#: PIL modes that hold more than 8 bits per sample, and the value that means full white
_HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _to_8bit(im: Image.Image) -> Image.Image:
    """A high-bit-depth grayscale image scaled (not clipped) to 8-bit ``L``.

    PIL's ``convert`` clips 16-bit values to 255, so a 16-bit PNG turns almost white. 16-bit
    samples (``I;16*``, and ``I``, which is how 16-bit PNG and TIFF files read in older Pillow)
    are divided by 257, so ``v * 257`` maps back to ``v`` exactly; float images (``F``) are taken
    as [0, 1]. Values outside the range are clipped. 48-bit RGB PNGs need nothing: PIL reads
    them as 8-bit RGB, keeping the high byte.
    """
    full = _HIGH_DEPTH[im.mode]
    a = np.asarray(im, dtype=np.float64) * (255.0 / full)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> the PIL mode a model of that many channels reads


def to_channels(im: Image.Image, channels: int = 3) -> Image.Image:
    """Upright, in the mode of a model with ``channels`` input channels (the adapter's ``in_chans``).

    The EXIF orientation is applied first (phone photos); then PIL converts: RGB, palette or RGBA
    to ``L`` for grayscale models (ITU-R 601 luma), grayscale to RGB (alpha dropped) for RGB models; high bit
    depths are scaled to 8 bits first.

    Raises:
        ImageError: a channel count PIL images cannot be converted to.
    """
    if channels not in _MODES:
        raise ImageError(
            f"The model takes {channels}-channel inputs, which images cannot be converted to (1, 3 or 4 "
            "channels). Pass a preprocessed [N, C, H, W] tensor instead."
        )
    im = ImageOps.exif_transpose(im)
    if im.mode in _HIGH_DEPTH:
        im = _to_8bit(im)
    mode = _MODES[channels]
    return im if im.mode == mode else im.convert(mode)


def per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Normalisation statistics for ``channels`` channels: ``values`` if they fit, else their mean
    for each channel (the RGB defaults of a library on a grayscale model)."""
    values = tuple(float(v) for v in values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def to_rgb(im: Image.Image) -> Image.Image:
    """Upright RGB (:func:`to_channels` with 3 channels)."""
    return to_channels(im, 3)


@dataclass
class ImageSet:
    """What will be probed: named images from files, PIL images or one preprocessed tensor."""

    names: list[str]
    paths: list[Path] | None = None
    pil: list[Image.Image] | None = None
    tensor: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    labels: list[str] | None = None  # per image, from a labelled source (probekit.inputs.sources)
    groups: list[str] | None = None
    # per image, an object with .open() -> PIL and .read() -> its bytes (tar members, dataset rows)
    refs: list | None = None
    lazy: bool = False  # listed without opening any image: unreadable ones are skipped when decoded
    strict: bool = False  # (lazy sets) an unreadable image stops the run
    origin: dict | None = None  # the source and sampling that listed the set (kept in run.json)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)
    _ids: list[str] | None = field(default=None, init=False, repr=False, compare=False)  # per image, by content
    _frames: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a name identifies an image's rows in every table: writable anywhere, and one per image
        self.names = [_writable(n) for n in self.names]
        if self.labels is not None:
            self.labels = [_writable(v) if isinstance(v, str) else v for v in self.labels]
        seen: set[str] = set()
        for name in self.names:
            if name in seen:
                raise ImageError(f"Two images are named {name!r}: a name identifies an image's rows, so an image "
                                 "set cannot list one name twice. List each image once, or rename one of the two.")
            seen.add(name)

    def __len__(self) -> int:
        return len(self.names)

    def _scan(self) -> None:
        """Read every image once: its content identity and frame count, kept per image (a subset
        reads nothing again). A tensor set is identified by its bytes instead."""
        if self._ids is not None or self.tensor is not None:
            return
        ids, frames = [], []
        for i in range(len(self.names)):
            if self.pil is not None:  # in-memory images are named image0, image1...: their pixels
                im = self.pil[i]
                ids.append(f"{im.mode}{im.size}{hashlib.sha256(im.tobytes()).hexdigest()}")
                frames.append(1)  # the frame the caller chose
            else:
                digest, n = _content(self.where(i))
                ids.append(digest)
                frames.append(n)
        self._ids, self._frames = ids, frames
        if self.notes:
            log.warning("Probed only the first frame of %d multi-frame image(s): %s", len(self.notes),
                        ", ".join(n for n, _ in self.notes))

    def fingerprint(self) -> str:
        """A hash of the image set (names, labels, and every image's bytes, pixels or the tensor's
        bytes), for caching.

        Computed once per set: it reads every file, tar member and dataset cell, and a comparison
        asks for it per model. Contents are hashed whole, whatever their size or container: a
        same-size replacement, or a shard rewritten with its size and time kept, must not be
        served the old image's values.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        if self.tensor is not None:
            # the array's buffer itself: the digest of its bytes without a copy of them
            h.update(self.tensor.detach().cpu().contiguous().numpy().data)
        self._scan()
        for i, name in enumerate(self.names):
            _update(h, name)
            if self.labels is not None:  # a part's table carries them
                _update(h, str(self.labels[i]))
            if self._ids is not None:
                _update(h, self._ids[i])
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def notes(self) -> list[tuple[str, str]]:
        """``(name, note)`` of images probed with a caveat: a multi-frame image (an animated GIF,
        a multi-page TIFF) is probed at its first frame. Reads the images once (see :meth:`fingerprint`)."""
        self._scan()
        # a tensor set has no frame counts (nothing to note): hence strict=False
        return [(n, f"{k} frames: only the first was probed")
                for n, k in zip(self.names, self._frames or [], strict=False) if k > 1]

    def subset(self, indices: Sequence[int], digests: bool = True) -> ImageSet:
        """The images at ``indices``, in that order. ``digests=False`` leaves out their content digests
        (what :meth:`fingerprint` hashes, half of a pickled path set): a subset that is only decoded
        (the Ray engine's chunks, shipped to its decoding tasks) never asks for them."""

        def pick(xs):
            return None if xs is None else [xs[i] for i in indices]

        out = ImageSet(
            names=pick(self.names), paths=pick(self.paths), pil=pick(self.pil),
            tensor=None if self.tensor is None else self.tensor[list(indices)],
            skipped=list(self.skipped), labels=pick(self.labels), groups=pick(self.groups),
            refs=pick(self.refs), lazy=self.lazy, strict=self.strict, origin=self.origin,
        )
        out._ids, out._frames = pick(self._ids) if digests else None, pick(self._frames)  # contents, read once
        return out

    def where(self, i: int) -> Any:
        """How image ``i`` is read: a path, a reference (``.open()``), or a PIL image."""
        if self.refs is not None:
            return self.refs[i]
        if self.paths is not None:
            return self.paths[i]
        assert self.pil is not None, "a tensor set has no images to read"  # callers check .tensor first
        return self.pil[i]

    def dataset(self, transform: Callable[[Image.Image], torch.Tensor] | None,
                channels: int = 3) -> torch.utils.data.Dataset:
        """A dataset of ``(index, pixel_values)``: images converted to ``channels`` (the model's
        ``in_chans``) and preprocessed by ``transform``; a tensor must already have ``channels``.

        Raises:
            ImageError: a tensor with another channel count (before any work is done).
        """
        if self.tensor is not None and self.tensor.shape[1] != channels:
            raise ImageError(
                f"The image tensor has {self.tensor.shape[1]} channels ({list(self.tensor.shape)}) but the model "
                f"takes {channels} (its adapter's in_chans). Pass [N, {channels}, H, W] tensors, or image files / "
                "PIL images, which probekit converts."
            )
        return _Images(self, transform, channels)


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, transform, channels: int = 3):
        self.images, self.transform, self.channels = images, transform, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        s = self.images
        if s.tensor is not None:
            return i, s.tensor[i]
        if self.transform is None:
            raise ImageError("This model has no preprocessing; pass a preprocessed [N, C, H, W] tensor.")
        try:
            im = open_image(s.where(i))  # decodes: a truncated JPEG that passed the listing fails here
        except ImageError as exc:
            if s.strict:  # (lazy sets; listed files were fully decoded up front under --strict)
                raise
            # one bad file costs that file only, never the model nor its finished batches
            log.warning("Skipped an image that cannot be decoded: %s", exc)
            return i, None  # dropped by collate(); probe() records it as skipped
        x = self.transform(to_channels(im, self.channels))
        return i, torch.as_tensor(x)


def open_image(where: Any) -> Image.Image:
    """A decoded PIL image from a path, a source reference (``.open()``) or a PIL image.

    Raises:
        ImageError: the file or record cannot be decoded.
    """
    if isinstance(where, Image.Image):
        return where
    try:
        if not isinstance(where, (str, os.PathLike)):
            return where.open()  # a source's reference (a tar member, a dataset row)
        with Image.open(where) as f:
            return f.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        shown = display_name(where) if isinstance(where, (str, os.PathLike)) else where
        raise ImageError(f"Cannot decode image {shown}: {exc}. Remove it or fix it.") from exc


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DataLoader collation: drops images a lazy set found unreadable (``(i, None)``); in the
    process that decodes, tunes malloc so resident memory stays flat over the set (probekit.inputs.memory)."""
    kept = [(i, x) for i, x in batch if x is not None]
    tame()  # once per process: malloc stops hoarding decoding buffers (probekit.inputs.memory)
    idx = torch.as_tensor([i for i, _ in kept], dtype=torch.long)
    return idx, (torch.stack([x for _, x in kept]) if kept else None)


def _from_paths(paths: list[Path], root: Path | None, strict: bool) -> ImageSet:
    keep, names, skipped = [], [], []
    for p in paths:
        name = display_name(p.relative_to(root) if root is not None else p)
        reason = _readable(p, decode=strict)
        if reason is None:
            keep.append(p)
            names.append(name)
        elif strict:
            raise ImageError(f"{display_name(p)} is not a readable image ({reason}). Remove it, or drop --strict "
                             "to skip it.")
        else:
            skipped.append((name, reason))
    for kind, group in _skip_groups(skipped).items():
        log.warning("Skipped %d %s: %s", len(group), kind, ", ".join(group))
    return ImageSet(names=names, paths=keep, skipped=skipped)


def _skip_groups(skipped: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Skipped names by kind: files that are no image, broken links, damaged or too large images."""
    groups: dict[str, list[str]] = {}
    for name, reason in skipped:
        kind = ("file(s) that are not images" if reason.startswith(NOT_AN_IMAGE)
                else "broken link(s)" if reason.startswith("broken link") else "unreadable image(s)")
        groups.setdefault(kind, []).append(name)
    return groups


def _scan(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files under ``folder`` (recursively, sorted), and what was passed over with why:
    other suffixes, and symlinks that lead nowhere (dangling, or a loop)."""
    files, passed = [], []
    for f in sorted(folder.rglob("*")):
        rel = display_name(f.relative_to(folder))
        if f.is_symlink() and not f.exists():
            passed.append((rel, "broken link: its target is missing or the links form a loop"))
        elif not f.is_file():
            continue
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            files.append(f)
        else:
            passed.append((rel, f"{NOT_AN_IMAGE} suffix"))
    return files, passed


def _refuse_overlaps(items: list) -> None:
    """Several folders and files name their images by the path given; the same image reached
    twice (one folder given twice, a file inside a given folder, a folder inside another) would
    be counted twice under two names, so it is refused."""
    real: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, (str, os.PathLike)) or str(item) == SAMPLE:
            continue
        r = os.path.realpath(Path(item).expanduser())
        if r in real:
            raise ImageError(f"{display_name(real[r])} and {display_name(item)} are one folder or file, listed twice "
                             "in images: list it once.")
        real[r] = item
    for r, item in real.items():
        child, up = r, os.path.dirname(r)
        while up != child:  # every folder above it, to the root
            if up in real:
                raise ImageError(f"{display_name(item)} is inside {display_name(real[up])}, and both are listed in "
                                 "images: its images would be listed twice. List the folder or the file, not both.")
            child, up = up, os.path.dirname(up)


def _from_array(images: Any) -> torch.Tensor:
    """A NumPy array as a tensor (then read as any tensor is: float preprocessed, uint8 pixels)."""
    return torch.as_tensor(np.array(images))


def _pixels_to_pil(x: torch.Tensor, channels_last: bool) -> list[Image.Image]:
    """uint8 pixels ``[H, W, C]``/``[N, H, W, C]`` (or channels first) -> PIL images, so each model
    preprocesses them its own way (resize, crop, its own mean and std)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ImageError(f"uint8 pixels must be [N, H, W, 3] or [N, 3, H, W]; got shape {tuple(x.shape)}.")
    if not channels_last:
        x = x.permute(0, 2, 3, 1)
    if x.shape[-1] not in (1, 3, 4):
        raise ImageError(f"uint8 pixels must have 1, 3 or 4 channels; got shape {tuple(x.shape)}.")
    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in x.cpu().numpy()]


def _from_tensor(images: torch.Tensor) -> ImageSet | list[Image.Image]:
    """A preprocessed float tensor as float32 ``[N, 3, H, W]``; uint8 pixels go through PIL."""
    if images.dtype == torch.uint8:  # raw pixels, not preprocessed: let each model preprocess them
        last = images.shape[-1] in (1, 3, 4) and (images.dim() < 3 or images.shape[-3] not in (1, 3))
        return _pixels_to_pil(images, channels_last=last)
    if not images.is_floating_point():
        raise ImageError(f"A tensor of images must be float (preprocessed [N, C, H, W]) or uint8 pixels; "
                         f"got {images.dtype}.")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:  # the channel count is checked against the model's in_chans (ImageSet.dataset)
        raise ImageError(
            f"A tensor of images must be [N, C, H, W] (preprocessed); got shape {tuple(images.shape)}."
        )
    # the model's weights are float32; autocast (dtype="bf16") lowers the compute itself
    return ImageSet(names=[str(i) for i in range(images.shape[0])], tensor=images.float())


def resolve_images(
    images: Any, *, strict: bool = False, count: int | None = None, seed: int = 0
) -> ImageSet:
    """Turn what a user passes into an :class:`ImageSet`.

    Args:
        images: ``"sample"`` (the bundled set), a folder (searched recursively), an image file,
            a list of files/folders, PIL images, or a preprocessed ``[N, C, H, W]`` tensor.
        strict: stop at the first unreadable file instead of skipping it with a warning.
        count, seed: a seeded random subset of ``count`` images.

    Raises:
        ImageError: a missing path, an empty set, or (``strict``) an unreadable file.
    """
    if type(images).__module__ == "numpy" and hasattr(images, "shape"):
        images = _from_array(images)
    if isinstance(images, torch.Tensor):
        images = _from_tensor(images)
    if (not isinstance(images, (ImageSet, Image.Image, str, os.PathLike, list, tuple)) and images is not None
            and not hasattr(images, "image_set")):
        raise ImageError(
            f"images= takes a folder, file paths, 'sample', PIL images, a NumPy array or a tensor; got "
            f"{type(images).__name__} ({images!r:.40})."
        )
    if isinstance(images, ImageSet):
        out = images
    elif hasattr(images, "image_set"):  # a probekit.inputs.sources source (class folders, manifest, shards, dataset)
        out = images.image_set(strict=strict)
    elif isinstance(images, Image.Image):
        out = ImageSet(names=["image0"], pil=[images])
    elif isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        out = ImageSet(names=[f"image{i}" for i in range(len(images))], pil=list(images))
    else:
        items = [images] if isinstance(images, (str, os.PathLike)) else list(images or [])
        if not items:
            raise ImageError("No images given. Pass a folder, files, or 'sample' for the bundled set.")
        several = len(items) > 1  # then every name keeps the folder or file as given: unique across items
        if several:
            _refuse_overlaps(items)
        parts = []
        for item in items:
            if str(item) == SAMPLE:
                part = _from_paths(sample_images(), None, strict)
                assert part.paths is not None  # listed from paths
                part.names = [f"{SAMPLE}/{q.name}" if several else q.name for q in part.paths]
                parts.append(part)
                continue
            if not isinstance(item, (str, os.PathLike)):
                raise ImageError(f"images= items must be paths (or all PIL images); got {type(item).__name__} "
                                 f"({item!r:.40}).")
            p = Path(item).expanduser()
            if p.is_dir():
                files, passed = _scan(p)
                part = _from_paths(files, None if several else p, strict)
                part.skipped += [(display_name(p / n) if several else n, why) for n, why in passed]
                for kind, group in _skip_groups(passed).items():
                    log.warning("Passed over %d %s in %s: %s", len(group), kind, display_name(p), ", ".join(group))
                parts.append(part)
            elif p.is_file():
                parts.append(_from_paths([p], None, strict))
            else:
                raise ImageError(f"No such file or folder: {display_name(p)}. Check the path, or use 'sample'.")
        paths: list[Path] = []
        for s in parts:
            assert s.paths is not None  # every part is listed from paths (_from_paths)
            paths += s.paths
        out = ImageSet(names=[n for s in parts for n in s.names], paths=paths,
                       skipped=[k for s in parts for k in s.skipped])
    if len(out) == 0:
        groups = _skip_groups(out.skipped)
        skipped = f" (skipped: {', '.join(f'{len(g)} {k}' for k, g in groups.items())})" if groups else ""
        raise ImageError(f"The image set is empty{skipped}. Point --images at a folder with images.")
    if count is not None and count < len(out):
        from probekit.inputs.sources.sampling import sample_indices

        out = out.subset(sample_indices(len(out), count, seed))
    return out
