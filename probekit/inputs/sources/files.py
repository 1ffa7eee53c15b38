"""Sources of image files: a folder of class folders (ImageNet layout) and a manifest table.

Both list paths with ``os.scandir`` or from the table alone: no image is opened, so an
ImageNet-val-size set (50,000 files) lists in well under a second of Python.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from probekit.errors import ConfigError, ImageError
from probekit.inputs.images import IMAGE_SUFFIXES, ImageSet
from probekit.inputs.sources.base import Source

__all__ = ["ClassFolder", "Manifest"]


def _walk(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive), as paths relative to it, sorted."""
    out = []
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(dirpath, folder)
        for f in files:
            if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES:
                out.append(f if rel == "." else os.path.join(rel, f))
    return sorted(out)


class ClassFolder(Source):
    """``root/<class>/.../<image>``: the label of an image is the name of its top sub-folder.

    >>> ClassFolder("imagenet/val", count=1000, stratify=True)   # doctest: +SKIP
    """

    kind = "classes"

    def __init__(self, root: str | os.PathLike, **sampling: Any):
        super().__init__(**sampling)
        self.root = Path(root).expanduser()

    def options(self) -> dict[str, Any]:
        return {"path": str(self.root)}

    def listing(self) -> ImageSet:
        if not self.root.is_dir():
            raise ImageError(f"No such folder: {self.root}. A class-folder source is a folder of "
                             "one sub-folder per class.")
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not classes:
            raise ImageError(f"{self.root} has no sub-folders. A class-folder source needs one "
                             "sub-folder per class (ImageNet layout); for a plain folder use kind: files.")
        names, paths, labels = [], [], []
        for c in classes:
            for rel in _walk(str(self.root / c)):
                name = f"{c}/{rel}"
                names.append(name)
                paths.append(self.root / name)
                labels.append(c)
        return ImageSet(names=names, paths=paths, labels=labels)


def _read_table(path: Path, columns: list[str]):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            have = pq.read_schema(path).names
            return pq.read_table(path, columns=[c for c in columns if c in have]).to_pandas(), have
        if suffix in (".csv", ".tsv"):
            have = list(pd.read_csv(path, nrows=0, sep=None if suffix == ".tsv" else ",").columns)
            df = pd.read_csv(path, usecols=[c for c in columns if c in have], dtype=str, keep_default_na=False,
                             sep="\t" if suffix == ".tsv" else ",")
            return df, have
    except (OSError, ValueError) as exc:
        raise ImageError(f"Cannot read the manifest {path}: {exc}.") from None
    raise ImageError(f"A manifest is a .csv, .tsv or .parquet file; got {path.name}.")


def _row_place(path: Path, i: int) -> str:
    """Where data row ``i`` (0-based) of a manifest is, for an error: a CSV's line (as an editor
    counts them, header and quoted line breaks included), a parquet table's row (from 1)."""
    if path.suffix.lower() == ".parquet":
        return f"row {i + 1}"
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        rows = (reader.line_num for row in reader if row)  # pandas skips blank lines
        next(rows, None)  # the header
        for _ in range(i):
            next(rows, None)
        return f"line {next(rows, i + 2)}"


class Manifest(Source):
    """A CSV or parquet table of images: a path column, optional label and group columns.

    Relative paths are taken relative to the manifest's folder; names are the paths as written.

    Args:
        path: the manifest file.
        path_column: the column of image paths.
        label_column: the column of labels (default: ``label`` when the table has one).
        group_column: a second grouping (e.g. a split or a source), kept in run.json.
    """

    kind = "manifest"

    def __init__(self, path: str | os.PathLike, *, path_column: str = "path", label_column: str | None = None,
                 group_column: str | None = None, **sampling: Any):
        super().__init__(**sampling)
        self.path = Path(path).expanduser()
        self.path_column, self.label_column, self.group_column = path_column, label_column, group_column

    def options(self) -> dict[str, Any]:
        return {"path": str(self.path), "path_column": self.path_column, "label_column": self.label_column,
                "group_column": self.group_column}

    def listing(self) -> ImageSet:
        if not self.path.is_file():
            raise ImageError(f"No such manifest: {self.path}. Give a CSV or parquet file with a "
                             f"{self.path_column!r} column.")
        label_col = self.label_column or "label"
        group_col = self.group_column or "group"
        df, have = _read_table(self.path, [self.path_column, label_col, group_col])
        for col, asked in ((self.path_column, True), (self.label_column, self.label_column),
                           (self.group_column, self.group_column)):
            if asked and col not in have:
                raise ConfigError(f"The manifest {self.path.name} has no column {col!r}; its columns: "
                                  f"{', '.join(map(str, have))}.")
        cells = df[self.path_column].tolist()
        empty = [i for i, v in enumerate(cells) if v is None or v != v or not str(v).strip()]  # (v != v: NaN)
        if empty:  # it would name the manifest's own folder
            more = f" (and {len(empty) - 1} more row(s))" if len(empty) > 1 else ""
            raise ImageError(f"The manifest {self.path} has no path in its {self.path_column!r} column at "
                             f"{_row_place(self.path, empty[0])}{more}: every row names one image. Fill in the "
                             "path or delete the row.")
        names = [str(v) for v in cells]
        base = self.path.parent
        paths = [Path(n) if os.path.isabs(n) else base / n for n in names]
        missing, folders = [], []
        for n, p in zip(names, paths, strict=True):  # one stat each
            try:
                if not stat.S_ISREG(os.stat(p).st_mode):
                    folders.append(n)
            except OSError:
                missing.append(n)
        if missing:
            raise ImageError(f"{len(missing)} path(s) of the manifest {self.path.name} do not exist, e.g. "
                             f"{', '.join(missing[:3])}. Paths are relative to the manifest's folder.")
        if folders:
            raise ImageError(f"{len(folders)} path(s) of the manifest {self.path.name} are not files, e.g. "
                             f"{', '.join(folders[:3])}. Each row names one image file.")
        if len(set(names)) != len(names):
            raise ImageError(f"The manifest {self.path.name} lists the same path twice; list each image once.")
        labels = df[label_col].astype(str).tolist() if label_col in df.columns else None
        groups = df[group_col].astype(str).tolist() if group_col in df.columns else None
        return ImageSet(names=names, paths=paths, labels=labels, groups=groups)
