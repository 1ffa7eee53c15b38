"""Hugging Face ``datasets`` data: a dataset saved with ``save_to_disk``, or its parquet files.

Offline by construction: nothing is fetched from a hub. Parquet is read with pyarrow alone
(no ``datasets`` needed); a ``save_to_disk`` folder needs the ``datasets`` package
(``pip install "probekit[hf]"``). Listing reads the label column only; each image is a row
reference that a decoding worker reads (one row group at a time, cached per process). A row is
identified by its image cell's bytes (:meth:`ImageSet.fingerprint` reads them), never by the
file's size and time; a row whose cell is empty is skipped by name when decoded, like any image
that cannot be decoded.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from probekit.errors import ConfigError, ImageError, MissingDependencyError
from probekit.inputs.images import ImageSet, display_name
from probekit.inputs.sources.base import Source, stamp

__all__ = ["HFDataset", "ParquetRow", "DiskRow"]


def _cell_bytes(cell: Any) -> bytes | None:
    """The encoded image of a cell of a ``datasets`` Image feature (``{"bytes", "path"}``, raw
    bytes or a path), or None for an empty cell (null, or neither bytes nor a path).

    Raises:
        OSError: the cell names a file that cannot be read.
    """
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
    else:
        data, path = (cell, None) if isinstance(cell, (bytes, bytearray)) else (None, cell)
    if data is not None:
        return bytes(data)
    if isinstance(path, (str, os.PathLike)) and str(path):
        with open(path, "rb") as f:
            return f.read()
    return None


def _decode_cell(cell: Any) -> Image.Image:
    data = _cell_bytes(cell)
    if data is None:  # open_image turns this into a skipped image, named
        raise ValueError("the image cell is empty (no bytes, no path)")
    with Image.open(io.BytesIO(data)) as im:
        return im.copy()


@functools.lru_cache(maxsize=2)
def _row_group(file: str, group: int, column: str, stamp_: str) -> list:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=[column]).column(0).to_pylist()


@dataclass(frozen=True)
class ParquetRow:
    """One image of a parquet file: row ``row`` of row group ``group``."""

    file: str
    group: int
    row: int
    column: str
    stamp: str

    def _cell(self) -> Any:
        return _row_group(self.file, self.group, self.column, self.stamp)[self.row]

    def read(self) -> bytes | None:
        """The image's bytes (None: an empty cell)."""
        return _cell_bytes(self._cell())

    def open(self) -> Image.Image:
        return _decode_cell(self._cell())

    def __str__(self) -> str:
        return f"{self.file}[{self.group}:{self.row}]"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError('Reading a save_to_disk dataset needs the datasets package: '
                                     'pip install "probekit[hf]" (or point at its parquet files).') from None
    return datasets


@functools.lru_cache(maxsize=2)
def _disk_dataset(path: str, split: str | None, column: str, stamp_: str):
    ds = _datasets().load_from_disk(path)
    if split is not None:
        ds = ds[split]
    return ds.select_columns([column]).cast_column(column, _datasets().Image(decode=False))


@dataclass(frozen=True)
class DiskRow:
    """One image of a ``save_to_disk`` dataset (row ``index`` of ``split``)."""

    path: str
    split: str | None
    index: int
    column: str
    stamp: str

    def _cell(self) -> Any:
        return _disk_dataset(self.path, self.split, self.column, self.stamp)[self.index][self.column]

    def read(self) -> bytes | None:
        """The image's bytes (None: an empty cell)."""
        return _cell_bytes(self._cell())

    def open(self) -> Image.Image:
        return _decode_cell(self._cell())

    def __str__(self) -> str:
        return f"{self.path}[{self.split}:{self.index}]"


def _class_names(schema_meta: dict | None, column: str) -> list[str] | None:
    """ClassLabel names that ``datasets`` keeps in parquet metadata, to label ints by name."""
    if schema_meta is None:
        return None
    try:
        feats = json.loads(schema_meta[b"huggingface"])["info"]["features"]
        return feats[column].get("names")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _labels(values: list, names: list[str] | None) -> list[str]:
    return [names[v] if names and isinstance(v, int) and 0 <= v < len(names) else str(v) for v in values]


class HFDataset(Source):
    """A ``datasets`` dataset saved to disk, or parquet files with an image column.

    Args:
        path: a ``save_to_disk`` folder, a parquet file, or a folder of parquet files.
        image_column: the column of images (a ``datasets`` Image feature or bytes).
        label_column: the column of labels (ClassLabel ints are named by the dataset's class names).
        split: the split of a saved ``DatasetDict`` (needed when it has several).
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, image_column: str = "image", label_column: str | None = None,
                 split: str | None = None, **sampling: Any):
        super().__init__(**sampling)
        self.path = Path(path).expanduser()
        self.image_column, self.label_column, self.split = image_column, label_column, split

    def options(self) -> dict[str, Any]:
        return {"path": str(self.path), "image_column": self.image_column, "label_column": self.label_column,
                "split": self.split}

    def _check_columns(self, have: list[str]) -> None:
        for col in (self.image_column, self.label_column):
            if col is not None and col not in have:
                raise ConfigError(f"The dataset at {self.path} has no column {col!r}; its columns: {', '.join(have)}.")

    def listing(self) -> ImageSet:
        if self.path.is_dir() and any((self.path / f).exists() for f in
                                      ("dataset_info.json", "state.json", "dataset_dict.json")):
            return self._from_disk()
        files = sorted(self.path.rglob("*.parquet")) if self.path.is_dir() else [self.path]
        if not files or not files[0].is_file():
            raise ImageError(f"No dataset at {self.path}: give a save_to_disk folder, a parquet file or a "
                             "folder of parquet files.")
        return self._from_parquet(files)

    def _from_parquet(self, files: list[Path]) -> ImageSet:
        import pyarrow.parquet as pq

        names: list[str] = []
        refs: list[ParquetRow] = []
        labels: list[str] = []
        for file in files:
            pf = pq.ParquetFile(file)
            self._check_columns(pf.schema_arrow.names)
            st = stamp(file)
            # a row is named by its file (relative to the folder: files of two sub-folders may share
            # a name) and its row in that file; the rows of a lone file by their row
            rel = display_name(file.relative_to(self.path).as_posix()) if file != self.path else ""
            first = len(refs)
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                base = len(refs) - first
                refs += [ParquetRow(str(file), g, r, self.image_column, st) for r in range(n)]
                names += [f"{rel}#{base + r}" if rel else f"{base + r}" for r in range(n)]
            if self.label_column:
                col = pf.read(columns=[self.label_column]).column(0).to_pylist()
                labels += _labels(col, _class_names(pf.schema_arrow.metadata, self.label_column))
        return ImageSet(names=names, refs=refs, labels=labels if self.label_column else None)

    def _from_disk(self) -> ImageSet:
        ds = _datasets().load_from_disk(str(self.path))
        if isinstance(ds, _datasets().DatasetDict):
            if self.split is None and len(ds) == 1:
                self.split = next(iter(ds))
            if self.split not in ds:
                raise ConfigError(f"The dataset at {self.path} has splits {', '.join(ds)}; choose one with split:.")
            ds = ds[self.split]
        self._check_columns(ds.column_names)
        st = stamp(next(self.path.rglob("*.arrow"), self.path))
        refs = [DiskRow(str(self.path), self.split, i, self.image_column, st) for i in range(len(ds))]
        names = [f"{self.split}/{i}" if self.split else str(i) for i in range(len(ds))]
        labels = None
        if self.label_column:
            feat = ds.features[self.label_column]
            labels = _labels(ds.data.column(self.label_column).to_pylist(), getattr(feat, "names", None))
        return ImageSet(names=names, refs=refs, labels=labels)
