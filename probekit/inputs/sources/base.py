"""What every image source shares: listing without decoding, then seeded sampling.

A source lists its images (names, where each is read from, labels) without opening any of
them, so a 50,000-image set is ready in a second and errors in the listing come before any
model loads. Images are decoded later, streamed batch by batch, by whichever engine runs;
an unreadable one is skipped then (with its name) or stops the run under ``strict``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, ClassVar

from probekit.errors import ConfigError, ImageError
from probekit.inputs.images import ImageSet
from probekit.inputs.sources.sampling import sample_indices

__all__ = ["Source", "stamp"]


_listings = itertools.count()


def stamp(path: Path) -> str:
    """A key for a process's cache of a container's contents (a parquet row group, a loaded
    dataset), made anew by every listing: a container rewritten in place keeps its size and
    time (``cp -p``, ``rsync -t``), so no cache outlives the listing that made its key. It
    identifies nothing: an image's identity is its bytes (:meth:`ImageSet.fingerprint`)."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{os.getpid()}:{next(_listings)}"


class Source:
    """An image source: :meth:`listing` says what is there; :meth:`image_set` samples it.

    Args:
        count: probe a seeded random subset of this many images (default: all).
        seed: the subset's seed.
        stratify: keep each label's share of the set in the subset (needs labels).
    """

    kind: ClassVar[str] = ""

    def __init__(self, *, count: int | None = None, seed: int = 0, stratify: bool = False):
        if count is not None and count <= 0:
            raise ConfigError(f"count must be a positive number of images; got {count}.")
        self.count, self.seed, self.stratify = count, int(seed), bool(stratify)

    def listing(self) -> ImageSet:
        """Every image of the source, listed without decoding any."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """What identifies the source in run.json (besides the sampling)."""
        return {}

    def image_set(self, strict: bool = False) -> ImageSet:
        """The images to probe: the listing, sampled; recorded in ``origin`` for run.json."""
        full = self.listing()
        if not len(full):
            raise ImageError(f"The {self.kind} source {self.options()} lists no images. Check the path.")
        if self.stratify and full.labels is None:
            raise ConfigError(f"stratify needs labels, and this {self.kind} source has none; "
                              "drop stratify or give a label column.")
        if strict and full.skipped:  # e.g. the members a truncated shard lost
            name, why = full.skipped[0]
            raise ImageError(f"{name}: {why}. Fix it, or drop --strict to probe the rest and list it as skipped.")
        idx = sample_indices(len(full), self.count, self.seed, full.labels, self.stratify)
        out = full if len(idx) == len(full) else full.subset(idx)
        out.lazy, out.strict = True, strict
        out.origin = {"kind": self.kind, **self.options(), "listed": len(full), "count": self.count,
                      "seed": self.seed, "stratify": self.stratify}
        return out

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
