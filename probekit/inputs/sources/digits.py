"""scikit-learn's handwritten digits: a real labelled image set that needs no download.

``sklearn.datasets.load_digits`` ships 1,797 images of 8x8 pixels (UCI optical recognition of
handwritten digits: each pixel counts the ink of a 4x4 block of a 32x32 bitmap, 0-16), with labels
0-9, 174-183 images per class. This source lists them as images ``digits/0000`` ... ``digits/1796``
labelled ``"0"`` ... ``"9"`` and decodes each, when a worker asks, as an RGB PIL image of ``size`` x
``size`` pixels: ink dark on white (``255 - round(v * 255 / 16)``, as the set's own figures draw
it), upscaled with PIL's ``nearest`` (the default: every source pixel a flat square, 28 x 28 px at
224, i.e. 2 x 2 patches of 14 px) or ``bilinear`` resampling. Each model's own preprocessing then
resizes and normalises it like any photo.

An image is identified by its 64 source pixels and the upscaling (size and resampling), so a
cached part is reused only for the same pixels drawn the same way. Sampling is the shared seeded
sampler (``count``, ``seed``, ``stratify``)::

    images: {kind: digits, count: 300, stratify: true, seed: 0}
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from probekit.errors import ConfigError, MissingDependencyError
from probekit.inputs.images import ImageSet
from probekit.inputs.sources.base import Source

__all__ = ["Digits", "DigitImage", "RESAMPLE"]

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
_INK_MAX = 16  # load_digits' pixel range is 0..16


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 pixels as uint8 ink (0 white .. 255 black, ``[1797, 8, 8]``) and the integer labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError("The digits source needs scikit-learn: pip install 'scikit-learn>=1.3'.") from None
    d = load_digits()
    ink = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / _INK_MAX)).astype(np.uint8)
    return ink, np.asarray(d.target, dtype=np.int64)


@dataclass(frozen=True)
class DigitImage:
    """One digit: image ``index`` of ``load_digits``, drawn ``size`` px square with ``resample``."""

    index: int
    size: int
    resample: str

    def read(self) -> bytes:
        """What identifies the image: its source pixels and how they are upscaled."""
        ink = _digits()[0][self.index]
        return f"load_digits 8x8 uint8 ink|{self.size}|{self.resample}|".encode() + ink.tobytes()

    def open(self) -> Image.Image:
        """The digit as an RGB image, dark ink on white, ``size`` x ``size`` pixels."""
        ink = _digits()[0][self.index]
        im = Image.fromarray(255 - ink, mode="L").resize((self.size, self.size), RESAMPLE[self.resample])
        return im.convert("RGB")

    def __str__(self) -> str:
        return f"load_digits[{self.index}] ({self.size} px, {self.resample})"


class Digits(Source):
    """scikit-learn's 1,797 handwritten digits (8x8 px, labels ``"0"``-``"9"``), upscaled to RGB.

    Args:
        size: the side of the square images, in pixels (default 224, an integer multiple of 8).
        resample: ``"nearest"`` (flat squares, the default) or ``"bilinear"``.
        count, seed, stratify: the seeded sample (:class:`~probekit.inputs.sources.base.Source`).

    Raises:
        ConfigError: a size below 8 or an unknown resampling.

    >>> s = Digits(count=20, stratify=True).image_set()
    >>> len(s), sorted(set(s.labels)) == [str(d) for d in range(10)], s.refs[0].open().size
    (20, True, (224, 224))
    """

    kind = "digits"

    def __init__(self, *, size: int = 224, resample: str = "nearest", **sampling: Any):
        super().__init__(**sampling)
        if int(size) < 8:
            raise ConfigError(f"The digits' size is the side of the upscaled image in pixels (at least 8); got {size}.")
        if resample not in RESAMPLE:
            raise ConfigError(f"Unknown resampling {resample!r} for the digits; choose from {', '.join(RESAMPLE)}.")
        self.size, self.resample = int(size), str(resample)

    def options(self) -> dict[str, Any]:
        return {"size": self.size, "resample": self.resample}

    def listing(self) -> ImageSet:
        labels = _digits()[1]
        n = len(labels)
        return ImageSet(names=[f"digits/{i:04d}" for i in range(n)],
                        refs=[DigitImage(i, self.size, self.resample) for i in range(n)],
                        labels=[str(int(v)) for v in labels])
