"""WebDataset tar shards, read with the standard library.

A WebDataset shard is a plain tar whose members are grouped by key: ``000123.jpg`` with
``000123.cls`` (its label) and any other fields. Listing reads the tar headers (and the tiny
label members), never an image: each image becomes a :class:`TarMember` reference (shard,
byte offset, size) that a decoding worker reads with one seek, in any process or machine
that sees the shard. A member is identified by its bytes (:meth:`ImageSet.fingerprint` reads
them), never by the shard's size and time, which a rewrite in place keeps.

A shard cut short (a copy or download that stopped) keeps its intact members: they are probed,
the members it cut are skipped by name (``--strict`` stops instead).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from probekit.errors import ImageError
from probekit.inputs.images import IMAGE_SUFFIXES, ImageSet, display_name
from probekit.inputs.sources.base import Source

log = logging.getLogger("probekit.inputs.sources")

__all__ = ["WebDataset", "TarMember", "expand_shards"]

_LABEL_EXTS = ("cls", "label", "txt")


@dataclass(frozen=True)
class TarMember:
    """One image inside an uncompressed tar: where its bytes are."""

    shard: str
    offset: int
    size: int
    member: str

    def read(self) -> bytes:
        """The member's bytes.

        Raises:
            OSError: the shard cannot be read, or now ends inside the member.
        """
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"the shard ends {self.size - len(data)} bytes before the end of member {self.member}")
        return data

    def open(self) -> Image.Image:
        with Image.open(io.BytesIO(self.read())) as im:
            return im.copy()

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
            raise ImageError(f"No tar shards match {self.shards}. Give a folder of .tar files, a glob or "
                             "shard-{000..009}.tar.")
        seen: dict[str, Path] = {}
        for shard in paths:
            real = os.path.realpath(shard)
            if real in seen:
                raise ImageError(f"The shard {display_name(shard)} is listed twice ({display_name(seen[real])}): "
                                 "list each shard once.")
            seen[real] = shard
        # images are named <shard file name>/<key>; by the shard's path when two shards share a file name
        short = len({p.name for p in paths}) == len(paths)
        names: list[str] = []
        refs: list[TarMember] = []
        labels: dict[str, str] = {}
        skipped: list[tuple[str, str]] = []
        for shard in paths:
            if not shard.is_file():
                raise ImageError(f"No such shard: {shard}.")
            _read_shard(shard, shard.name if short else display_name(shard), names, refs, labels, skipped)
        found = [labels[n] for n in names if n in labels]
        if found and len(found) != len(names):
            missing = [n for n in names if n not in labels]
            raise ImageError(f"{len(missing)} sample(s) have no label member, e.g. {missing[0]}; give "
                             "every sample a .cls, or none.")
        return ImageSet(names=names, refs=refs, labels=found or None, skipped=skipped)


def _read_shard(shard: Path, prefix: str, names: list, refs: list, labels: dict, skipped: list) -> None:
    """One shard's image members (appended to ``names`` and ``refs``) and labels. A shard that
    ends early keeps the samples before the cut; those it cuts go to ``skipped``, by name."""
    size = shard.stat().st_size
    keys: dict[str, TarMember] = {}
    cut: dict[str, str] = {}  # sample key -> the field the shard ends in (image or label)
    tar, short = None, False
    try:
        with tarfile.open(shard, mode="r:") as tar:  # uncompressed only: members are read by offset
            for info in tar:
                stem, ext = _split(info.name)
                field = ("label" if ext.lower() in _LABEL_EXTS
                         else "image" if "." + ext.lower() in IMAGE_SUFFIXES else "")
                if not info.isfile() or not field:
                    continue
                key = f"{prefix}/{stem}"
                if info.offset_data + info.size > size:  # the shard ends inside this member
                    cut[key] = field
                elif field == "label":
                    member = tar.extractfile(info)
                    assert member is not None  # a file member (info.isfile() above)
                    labels[key] = _label(member.read(), shard, info.name)
                elif key in keys:
                    raise ImageError(f"The shard {display_name(shard)} holds two images of the sample {stem!r} "
                                     f"({keys[key].member}, {info.name}): give each sample one image.")
                else:
                    keys[key] = TarMember(str(shard), info.offset_data, info.size, info.name)
    except tarfile.ReadError as exc:
        if tar is None:  # not even one whole header: not an uncompressed tar
            raise ImageError(f"{display_name(shard)} is not an uncompressed tar shard ({exc}). Shards are read by "
                             "offset: decompress .tar.gz shards first.") from None
        short = True  # (it may end in a header or padding: then no listed member is lost)
    if short or cut or not _ends_cleanly(shard, size):
        where = f", inside the sample {next(reversed(cut))}" if cut else ""
        skipped.append((display_name(shard), f"truncated tar shard: it ends after {size} bytes{where}, and the "
                        "members past that are missing (copy it again)"))
        log.warning("%s is truncated (it ends after %d bytes%s): probing its %d intact image(s)%s.",
                    display_name(shard), size, where, len([k for k in keys if k not in cut]),
                    f"; skipped, cut short: {', '.join(cut)}" if cut else "")
    for key, field in cut.items():
        skipped.append((key, f"cut short: the shard is truncated inside this sample's {field}"))
    for key, ref in keys.items():
        if key not in cut:  # (a sample whose label was cut loses its image too)
            names.append(key)
            refs.append(ref)


def _ends_cleanly(shard: Path, size: int) -> bool:
    """Whether a tar ends as tar files do, in two zero blocks: a copy cut between two members
    reads as a whole shard otherwise (the tar reader stops there without an error)."""
    if size < 1024:
        return False
    with open(shard, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024).count(0) == 1024


def _label(data: bytes, shard: Path, member: str) -> str:
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise ImageError(f"The label member {member} of {display_name(shard)} is not UTF-8 text ({data[:16]!r}); "
                         "a WebDataset label (.cls, .label, .txt) is text such as 3 or tabby_cat. Fix or remove "
                         "that member.") from None


def _split(member: str) -> tuple[str, str]:
    """WebDataset's key rule: the key is the path up to the first dot of the file name."""
    d, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext
