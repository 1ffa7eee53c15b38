"""Image sources with labels: class folders, manifests, WebDataset shards, ``datasets`` data.

Every source lists its images without decoding any (names, where each is read from, labels)
and samples them with one seeded sampler (:func:`sample_indices`, optionally stratified by
label). Pass a source wherever images go (``pk.probe(pm, source)``), or name it in a run
file::

    images: {kind: classes, path: imagenet/val, count: 1000, stratify: true, seed: 0}
    images: {kind: manifest, path: images.csv, label_column: species}
    images: {kind: webdataset, path: "shards/val-{000000..000063}.tar"}
    images: {kind: hf, path: saved_dataset/, image_column: image, label_column: label, split: validation}
    images: {kind: digits, count: 300, stratify: true}   # scikit-learn's digits, no path, no download
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from probekit.errors import ConfigError
from probekit.inputs.images import ImageSet, resolve_images
from probekit.inputs.sources.base import Source
from probekit.inputs.sources.digits import Digits
from probekit.inputs.sources.files import ClassFolder, Manifest
from probekit.inputs.sources.hf import HFDataset
from probekit.inputs.sources.sampling import sample_indices
from probekit.inputs.sources.shards import WebDataset

__all__ = ["Source", "ClassFolder", "Manifest", "WebDataset", "HFDataset", "Digits", "sample_indices", "from_entry",
           "detect_kind", "KINDS"]

KINDS = ("files", "classes", "manifest", "webdataset", "hf", "digits")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def detect_kind(paths: list[str], path_column: str = "path") -> str:
    """The source kind a run file's ``images`` means when it says no ``kind``.

    A .csv/.tsv is a manifest, a .parquet a manifest when it has ``path_column`` (else a
    dataset's parquet), .tar files are shards, a ``save_to_disk`` folder is a dataset;
    anything else is plain files and folders (names are relative paths, no labels).
    """
    if len(paths) != 1 and not all(str(p).endswith(".tar") for p in paths):
        return "files"
    p = Path(str(paths[0])).expanduser()
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "manifest"
    if suffix == ".parquet" and p.is_file():
        import pyarrow.parquet as pq

        return "manifest" if path_column in pq.read_schema(p).names else "hf"
    if suffix == ".tar" or "{" in str(p):
        return "webdataset"
    if p.is_dir() and any((p / m).exists() for m in _HF_MARKERS):
        return "hf"
    return "files"


def from_entry(entry: Any, strict: bool = False) -> ImageSet:
    """The image set of a run file's ``images:`` (a :class:`probekit.runs.config.ImagesEntry`)."""
    kind = entry.kind if entry.kind != "auto" else detect_kind(entry.path, entry.path_column)
    sampling = {"count": entry.count, "seed": entry.seed, "stratify": entry.stratify}
    if kind == "digits":
        return Digits(size=entry.size, resample=entry.resample, **sampling).image_set(strict=strict)
    if entry.size != 224 or entry.resample != "nearest":
        raise ConfigError(f"size and resample draw the digits (kind: digits); a {kind} source takes neither.")
    one = entry.path[0]
    if kind != "webdataset" and kind != "files" and len(entry.path) != 1:
        raise ConfigError(f"A {kind} source takes one path; got {len(entry.path)}.")
    if kind == "files":
        if entry.stratify:
            raise ConfigError("stratify needs labels: use kind: classes, manifest, webdataset or hf.")
        return resolve_images(entry.path, strict=strict, count=entry.count, seed=entry.seed)
    if kind == "classes":
        src: Source = ClassFolder(one, **sampling)
    elif kind == "manifest":
        src = Manifest(one, path_column=entry.path_column, label_column=entry.label_column,
                       group_column=entry.group_column, **sampling)
    elif kind == "webdataset":
        src = WebDataset(entry.path if len(entry.path) > 1 else one, **sampling)
    else:
        src = HFDataset(one, image_column=entry.image_column, label_column=entry.label_column,
                        split=entry.split, **sampling)
    return src.image_set(strict=strict)
