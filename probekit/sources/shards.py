"""WebDataset tar shards, read with the standard library.

A WebDataset shard is a plain tar whose members are grouped by key: ``000123.jpg`` with
``000123.cls`` (its label) and any other fields. Listing reads the tar headers (and the tiny
label members), never an image: each image becomes a :class:`TarMember` reference (shard,
byte offset, size) that a decoding worker reads with one seek, in any process or machine
that sees the shard.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ImageError
from ..images import IMAGE_SUFFIXES, ImageSet
from .base import Source, stamp

__all__ = ["WebDataset", "TarMember", "expand_shards"]

_LABEL_EXTS = ("cls", "label", "txt")


@dataclass(frozen=True)
class TarMember:
    """One image inside an uncompressed tar: where its bytes are."""

    shard: str
    offset: int
    size: int
    member: str
    stamp: str  # the shard's size:mtime when listed

    def open(self) -> Image.Image:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        with Image.open(io.BytesIO(data)) as im:
            return im.copy()

    def ident(self) -> str:
        return f"{self.shard}:{self.stamp}:{self.member}"

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"


def expand_shards(pattern: str | os.PathLike | list) -> list[Path]:
    """Shard paths from a list, a glob, or WebDataset's brace notation ``shard-{000..009}.tar``."""
    if isinstance(pattern, (list, tuple)):
        return [p for item in pattern for p in expand_shards(item)]
    s = str(Path(pattern).expanduser())
    m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        return [p for i in range(int(lo), int(hi) + 1)
                for p in expand_shards(s[:m.start()] + str(i).zfill(width) + s[m.end():])]
    if any(c in s for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(s))]
    p = Path(s)
    return sorted(p.glob("*.tar")) if p.is_dir() else [p]


class WebDataset(Source):
    """Images from WebDataset tar shards; labels from each sample's ``.cls`` (or ``.label``, ``.txt``).

    Args:
        shards: a folder of ``.tar`` files, a glob, brace notation, or a list of them.
    """

    kind = "webdataset"

    def __init__(self, shards: str | os.PathLike | list, **sampling: Any):
        super().__init__(**sampling)
        self.shards = shards

    def options(self) -> dict[str, Any]:
        return {"path": [str(s) for s in self.shards] if isinstance(self.shards, (list, tuple)) else str(self.shards)}

    def listing(self) -> ImageSet:
        paths = expand_shards(self.shards)
        if not paths:
            raise ImageError(f"No tar shards match {self.shards}. Give a folder of .tar files, a glob or shard-{{000..009}}.tar.")
        names, refs, labels = [], [], {}
        for shard in paths:
            if not shard.is_file():
                raise ImageError(f"No such shard: {shard}.")
            st = stamp(shard)
            try:
                with tarfile.open(shard, mode="r:") as tar:  # uncompressed only: members are read by offset
                    for info in tar:
                        if not info.isfile():
                            continue
                        stem, ext = _split(info.name)
                        key = f"{shard.name}/{stem}"
                        if ext.lower() in _LABEL_EXTS:
                            labels[key] = tar.extractfile(info).read().decode().strip()
                        elif "." + ext.lower() in IMAGE_SUFFIXES:
                            names.append(key)
                            refs.append(TarMember(str(shard), info.offset_data, info.size, info.name, st))
            except tarfile.ReadError as exc:
                raise ImageError(f"{shard} is not an uncompressed tar shard ({exc}). Shards are read by "
                                 "offset: decompress .tar.gz shards first.") from None
        found = [labels.get(n) for n in names]
        has_labels = any(lab is not None for lab in found)
        if has_labels and None in found:
            missing = [n for n, lab in zip(names, found) if lab is None]
            raise ImageError(f"{len(missing)} sample(s) have no label member, e.g. {missing[0]}; give "
                             "every sample a .cls, or none.")
        return ImageSet(names=names, refs=refs, labels=found if has_labels else None)


def _split(member: str) -> tuple[str, str]:
    """WebDataset's key rule: the key is the path up to the first dot of the file name."""
    d, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext
