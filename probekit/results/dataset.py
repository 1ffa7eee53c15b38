"""Results as a partitioned Parquet dataset: ``results.parquet/`` is a folder of part files.

Why: a run's rows must never gather in one process (issue 24). Each part (one model x metric x
shard) is written by the process that computed it, as ``model=<m>/metric=<k>/part-<shard>.parquet``
(hive-style, values URI-encoded as pyarrow reads them back), holding the columns ``image``,
``layer``, ``head``, ``value`` (and extras such as ``label``): pandas, pyarrow, polars and DuckDB
read the folder as one table, ``model`` and ``metric`` coming from the folder names.
``_probekit.json`` beside the parts (a name every Parquet reader skips) lists the parts in the
run's order and holds the provenance that a single file keeps in its schema metadata.

Readers here never load every row: :class:`ResultsScan` filters parts by model and metric before
reading, summaries merge per-part moments (Chan's parallel variance), and the per-image values
that contrasts need are read one part at a time. A single-file ``results.parquet`` written before
this layout reads through the same scan.

File I/O goes through the few functions at the top of this module (``_write_parquet``,
``_write_batches``, ``_write_json``, ``_read_json``, ``_exists``), so that another storage layer can
take their place (a part a run no longer lists is removed by the run directory, which owns it).
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probekit._io.atomic import atomic_path, write_text_atomic
from probekit.results.table import _META_KEY, COLUMNS, _t95

__all__ = ["DatasetWriter", "ResultsScan", "PartInfo", "part_name", "is_dataset", "INDEX", "merge_moments"]

INDEX = "_probekit.json"  # the dataset's index: its parts in order, and the results' provenance
_FORMAT = 1
#: rows per part file at most (about): a model's rows for a metric are split into parts of this size, so
#: what reads a dataset part by part (summaries, contrasts) never holds more than this many rows at once
PART_ROWS = 1 << 20
_KEYS = ("model", "metric")


# -- file I/O: the only places this module touches storage ---------------------------------------
def _write_parquet(table: Any, path: Path) -> None:
    """Write a pyarrow table to ``path`` atomically (its folder is created)."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_batches(batches: Iterator[Any], schema: Any, path: Path, max_rows: int | None = None) -> int:
    """Write pyarrow record batches to one Parquet file at ``path`` atomically, one batch in memory
    at a time; returns the number of rows. With ``max_rows``, it stops after the batch that reaches
    it, leaving the rest in ``batches``."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as out:
        for batch in batches:
            out.write_batch(batch)
            rows += batch.num_rows
            if max_rows is not None and rows >= max_rows:
                break
    return rows


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, default=str))


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


# -- names -----------------------------------------------------------------------------------------
def _enc(value: str) -> str:
    return urllib.parse.quote(str(value), safe="")


def part_name(model: str, metric: str, shard: int | str = 0) -> str:
    """The path of a part file relative to the dataset folder.

    >>> part_name("vit/b 16", "mad", 3)
    'model=vit%2Fb%2016/metric=mad/part-00003.parquet'
    """
    tail = f"{shard:05d}" if isinstance(shard, int) else _enc(shard)
    return f"model={_enc(model)}/metric={_enc(metric)}/part-{tail}.parquet"


def is_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a results folder (this layout), not a single Parquet file."""
    return Path(path).is_dir()


@dataclass(frozen=True)
class PartInfo:
    """One part file of a dataset: where it is (relative to the folder), whose rows, how many."""

    path: str
    model: str
    metric: str
    rows: int


# -- writing ---------------------------------------------------------------------------------------
_ROW_TYPES = {"image": "string", "layer": "int16", "head": "int16", "value": "float64"}


def _arrow_rows(table: pd.DataFrame | Any) -> Any:
    """A part's rows as a pyarrow table without the partition columns, in the results' column types."""
    import pyarrow as pa

    if isinstance(table, pa.Table):
        tbl = table.drop_columns([c for c in _KEYS if c in table.column_names])
    else:
        df = table.drop(columns=[c for c in _KEYS if c in table.columns])
        tbl = pa.Table.from_pandas(df, preserve_index=False)
    cols = {}
    for name in tbl.column_names:
        col = tbl[name]
        want = _ROW_TYPES.get(name)
        if want is not None:
            col = col.cast(pa.string() if want == "string" else getattr(pa, want)())
        elif pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        cols[name] = col
    order = [c for c in _ROW_TYPES if c in cols] + [c for c in cols if c not in _ROW_TYPES]
    return pa.table({c: cols[c] for c in order})


class DatasetWriter:
    """Writes the part files of one results folder, then its index.

    ``own``, when given, is called with a part's name (relative to the run directory) before the
    file is written: the run directory records it (and refuses a file no probekit run wrote).
    A Ray replica writes its own parts with a writer of its own and hands back :class:`PartInfo`;
    the driver adds them with :meth:`add` and commits.
    """

    def __init__(self, root: str | Path, own: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.own = own
        self.parts: list[PartInfo] = []

    def write(self, table: pd.DataFrame | Any, model: str, metric: str, shard: int | str = 0) -> PartInfo | None:
        """Write one part's rows (a pandas or pyarrow table; ``model``/``metric`` columns, if any,
        are left to the folder names). None when there are no rows (nothing is written)."""
        if not len(table):
            return None
        info = PartInfo(part_name(model, metric, shard), str(model), str(metric), len(table))
        if self.own is not None:
            self.own(info.path)
        _write_parquet(_arrow_rows(table), self.root / info.path)
        self.add(info)
        return info

    def write_file(self, source: str | Path, model: str, shard: int | str = 0, batch_rows: int = 1 << 16,
                   columns: dict[str, Any] | None = None, part_rows: int = PART_ROWS) -> list[PartInfo]:
        """Copy the rows of a long-table Parquet file (a cached part, :meth:`probekit.results.Results.to_parquet`)
        into parts per metric of at most about ``part_rows`` rows each (``part-<shard>``, then
        ``part-<shard>-00001``, ...), under ``model`` (whatever the file's model column says), reading
        ``batch_rows`` rows at a time: the rows never all sit in memory, nor does a part when read."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(source)
        if pf.metadata.num_rows == 0:
            return []
        metrics = list(dict.fromkeys(str(x) for x in pc.unique(pq.read_table(source, columns=["metric"])["metric"])
                                     .cast("string").to_pylist()))
        out = []
        schema = _arrow_rows(pa_table(next(pf.iter_batches(batch_size=1)))).schema
        for metric in metrics:

            def batches(metric: str = metric) -> Iterator[Any]:
                for b in pf.iter_batches(batch_size=batch_rows):
                    rows = _arrow_rows(pa_table(b).filter(pc.equal(pc.cast(b.column("metric"), "string"), metric)))
                    if rows.num_rows:
                        yield from rows.to_batches()

            left, k = batches(), 0
            while (head := next(left, None)) is not None:
                tail = shard if not k else f"{shard:05d}-{k:05d}" if isinstance(shard, int) else f"{shard}-{k:05d}"
                info = PartInfo(part_name(model, metric, tail), str(model), metric, 0)
                if self.own is not None:
                    self.own(info.path)
                n = _write_batches(itertools.chain([head], left), schema, self.root / info.path, part_rows)
                info = PartInfo(info.path, info.model, metric, n)
                self.add(info)
                out.append(info)
                k += 1
        return out

    def write_results(self, table: pd.DataFrame, shard: int | str = 0) -> list[PartInfo]:
        """Write a long table (:data:`probekit.results.COLUMNS`) as one part per model and metric."""
        out = []
        for (model, metric), rows in table.groupby([table["model"].astype(str), table["metric"].astype(str)],
                                                   sort=False):
            info = self.write(rows, model, metric, shard)
            if info is not None:
                out.append(info)
        return out

    def add(self, info: PartInfo) -> None:
        """Count a part written elsewhere (by a Ray replica) as one of this dataset's."""
        self.parts = [p for p in self.parts if p.path != info.path] + [info]

    def commit(self, meta: dict | None = None) -> list[str]:
        """Write the index (the parts in order, and ``meta``); returns every file of the dataset,
        relative to its folder, the index last."""
        if self.own is not None:
            self.own(INDEX)
        index = {"format": _FORMAT, "parts": [p.__dict__ for p in self.parts], "meta": meta or {}}
        _write_json(self.root / INDEX, index)
        return [p.path for p in self.parts] + [INDEX]


def pa_table(batch: Any) -> Any:
    """A pyarrow record batch as a table."""
    import pyarrow as pa

    return pa.Table.from_batches([batch])


# -- reading ---------------------------------------------------------------------------------------
def _hive() -> Any:
    import pyarrow as pa
    import pyarrow.dataset as ds

    return ds.partitioning(pa.schema([("model", pa.string()), ("metric", pa.string())]), flavor="hive")


def _index(root: Path) -> dict | None:
    """The dataset's index, or None when it has none (a folder written by another tool)."""
    if not _exists(root / INDEX):
        return None
    data = _read_json(root / INDEX)
    if not isinstance(data, dict) or not isinstance(data.get("parts"), list):
        raise ValueError(f"{root / INDEX} is not a probekit results index")
    return data


def _parts_of_folder(root: Path) -> list[PartInfo]:
    """Parts found by listing a folder that has no index (hive names only; sorted)."""
    out = []
    for p in sorted(root.rglob("*.parquet")):
        rel = p.relative_to(root).as_posix()
        keys = dict(seg.split("=", 1) for seg in rel.split("/")[:-1] if "=" in seg)
        if any(seg.startswith((".", "_")) for seg in rel.split("/")) or set(keys) != set(_KEYS):
            continue
        out.append(PartInfo(rel, urllib.parse.unquote(keys["model"]), urllib.parse.unquote(keys["metric"]), -1))
    return out


def merge_moments(parts: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Merge per-part group statistics (``n``, ``mean``, ``m2`` = sum of squared deviations,
    ``n_nonfinite``) into one row per group of ``by`` (Chan et al.'s parallel update).

    >>> p = pd.DataFrame({"g": [0, 0], "n": [2, 2], "mean": [1.0, 3.0], "m2": [2.0, 2.0], "n_nonfinite": [0, 1]})
    >>> merge_moments(p, ["g"]).to_dict("records")   # [0, 2] and [2, 4]: mean 2, m2 = 8
    [{'g': 0, 'n': 4, 'mean': 2.0, 'm2': 8.0, 'n_nonfinite': 1}]
    """
    if not parts.duplicated(by).any():
        return parts.reset_index(drop=True)
    rows = []
    for key, g in parts.groupby(by, sort=False, observed=True):
        n, mean, m2 = 0, np.nan, np.nan
        for nb, mb, qb in zip(g["n"], g["mean"], g["m2"], strict=True):
            if nb == 0:
                continue
            if n == 0:
                n, mean, m2 = int(nb), float(mb), float(qb)
                continue
            tot = n + nb
            delta = mb - mean
            mean = mean + delta * nb / tot
            m2 = m2 + qb + delta * delta * n * nb / tot
            n = tot
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                     "n": n, "mean": mean, "m2": m2, "n_nonfinite": int(g["n_nonfinite"].sum())})
    return pd.DataFrame(rows)


class ResultsScan:
    """A results table opened lazily: filter it by models, metrics and layers, then read what is needed.

    ``Results.scan(path)`` makes one, of a run directory, its ``results.parquet`` folder or a
    single-file ``results.parquet`` of an earlier version. Nothing is read but the index until
    a method asks for rows, and each method reads one part at a time.
    """

    #: what :meth:`to_results` makes: :class:`probekit.results.Results`, set by that module when it is
    #: imported (it imports this one, never the reverse: importing this module imports the package first)
    results_type: Callable[..., Any]

    def __init__(self, path: str | Path, *, models: list[str] | None = None, metrics: list[str] | None = None,
                 layers: list[int] | None = None):
        path = Path(path)
        if path.is_dir() and (path / "results.parquet").exists():
            path = path / "results.parquet"
        self.path = path
        self.models_filter, self.metrics_filter = models, metrics
        self.layers_filter = None if layers is None else [int(x) for x in layers]
        self.meta: dict = {}
        self._single = not path.is_dir()
        if self._single:
            import pyarrow.parquet as pq

            md = pq.read_schema(path).metadata or {}
            self.meta = json.loads(md.get(_META_KEY, b"{}"))
            self._all: list[PartInfo] = []
        else:
            index = _index(path)
            if index is None:
                self._all = _parts_of_folder(path)
            else:
                self._all = [PartInfo(**p) for p in index["parts"]]
                self.meta = index.get("meta") or {}

    @classmethod
    def of_parts(cls, root: str | Path, parts: list[PartInfo], meta: dict | None = None) -> ResultsScan:
        """A scan of ``parts`` of the folder ``root`` (a dataset being written: no index yet)."""
        out = object.__new__(cls)
        out.path, out.meta, out._single, out._all = Path(root), dict(meta or {}), False, list(parts)
        out.models_filter = out.metrics_filter = out.layers_filter = None
        return out

    def relabelled(self, model: str) -> ResultsScan:
        """This scan of one model's rows under another label (a cached part reused by a renamed model)."""
        out = self.filter()
        out._model_as = str(model)
        return out

    _model_as: str | None = None

    def filter(self, models: list[str] | None = None, metrics: list[str] | None = None,
               layers: list[int] | None = None) -> ResultsScan:
        """The same scan restricted further (``None`` keeps the current restriction)."""
        out = object.__new__(ResultsScan)
        out.__dict__.update(self.__dict__)
        out.models_filter = models if models is not None else self.models_filter
        out.metrics_filter = metrics if metrics is not None else self.metrics_filter
        out.layers_filter = [int(x) for x in layers] if layers is not None else self.layers_filter
        return out

    # -- what is there (from the index) ------------------------------------------------------------
    def parts(self) -> list[PartInfo]:
        """The part files this scan reads (none for a single file)."""
        return [p for p in self._all if (self.models_filter is None or p.model in self.models_filter)
                and (self.metrics_filter is None or p.metric in self.metrics_filter)]

    @property
    def models(self) -> list[str]:
        if self._single:
            return list(dict.fromkeys(self._column("model")))
        return list(dict.fromkeys(p.model for p in self.parts()))

    @property
    def metrics(self) -> list[str]:
        if self._single:
            return list(dict.fromkeys(self._column("metric")))
        return list(dict.fromkeys(p.metric for p in self.parts()))

    @property
    def columns(self) -> list[str]:
        """The table's column names (:data:`probekit.results.COLUMNS`, then extras), from one part's schema."""
        import pyarrow.parquet as pq

        if self._single:
            names = pq.read_schema(self.path).names
        elif self._all:
            names = [*pq.read_schema(self.path / self._all[0].path).names, *_KEYS]
        else:
            return list(COLUMNS)
        return [*COLUMNS, *(n for n in names if n not in COLUMNS)]

    def _column(self, name: str) -> list[str]:
        """The distinct values of a column, in order of first appearance."""
        import pyarrow.compute as pc

        col = self._arrow(columns=[name])[name]
        return [str(x) for x in pc.unique(col.cast(col.type.value_type) if hasattr(col.type, "value_type")
                                          else col).to_pylist()]

    # -- rows --------------------------------------------------------------------------------------
    def _filter(self, extra: Any = None) -> Any:
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        expr = extra
        for name, values in (("model", self.models_filter), ("metric", self.metrics_filter),
                             ("layer", self.layers_filter)):
            if values is not None:
                e = pc.field(name).isin(values)
                expr = e if expr is None else expr & e
        return expr if expr is not None else ds.scalar(True)

    def _dataset(self, parts: list[PartInfo] | None = None) -> Any:
        """A pyarrow dataset of ``parts`` (default: all this scan covers), or of the single file."""
        import pyarrow.dataset as ds

        if self._single:
            return ds.dataset(self.path, format="parquet")
        files = [str(self.path / p.path) for p in (self.parts() if parts is None else parts)]
        return ds.dataset(files, format="parquet", partitioning=_hive(), partition_base_dir=str(self.path))

    def has_heads(self) -> bool:
        """Whether any row the scan covers is a head's (head >= 0), reading the head column part by
        part until one is."""
        import pyarrow.compute as pc

        if self._single:
            return self._arrow(["head"], where=pc.field("head") >= 0).num_rows > 0
        return any(self._arrow(["head"], [p], where=pc.field("head") >= 0).num_rows for p in self.parts())

    def count_rows(self) -> int:
        """How many rows the scan covers, without reading one: from the index when it counts every part
        (and no layer filter applies), else from the files' footers and the filtered columns."""
        parts = None if self._single else self.parts()
        if parts is not None and (not parts or (self.layers_filter is None and all(p.rows >= 0 for p in parts))):
            return sum(p.rows for p in parts)
        return int(self._dataset(parts).count_rows(filter=self._filter()))

    def _arrow(self, columns: list[str] | None = None, parts: list[PartInfo] | None = None, where: Any = None) -> Any:
        """The rows (pyarrow) of ``parts`` (default: all this scan covers), filtered, in part order."""
        tbl = self._dataset(parts).to_table(columns=columns, filter=self._filter(where))
        if self._model_as is not None and "model" in tbl.column_names:
            import pyarrow as pa

            tbl = tbl.set_column(tbl.column_names.index("model"), "model",
                                 pa.array([self._model_as] * tbl.num_rows, pa.string()))
        return tbl

    def to_arrow(self, columns: list[str] | None = None) -> Any:
        """The filtered rows as one pyarrow table (model and metric as columns)."""
        return self._arrow(columns)

    def iter_parts(self, columns: list[str] | None = None,
                   where: Any = None) -> Iterator[tuple[str, str, pd.DataFrame]]:
        """``(model, metric, rows)`` one part at a time (a single file: one group at a time)."""
        if self._single:
            t = self._arrow(None if columns is None else [*_KEYS, *columns], where=where).to_pandas()
            for (model, metric), g in t.groupby([t["model"].astype(str), t["metric"].astype(str)], sort=False):
                yield model, metric, g
            return
        for p in self.parts():
            yield p.model, p.metric, self._arrow(columns, [p], where).to_pandas()

    def to_results(self) -> Any:
        """Materialise the filtered rows as :class:`~probekit.results.Results` (every row in memory)."""
        if self._single or not self.parts():
            tbl = self._arrow() if self._single else None
            df = tbl.to_pandas() if tbl is not None else pd.DataFrame(columns=COLUMNS)
        else:
            df = self._arrow().to_pandas()
        return self.results_type(df, meta=dict(self.meta))

    def summary(self, by: tuple[str, ...] = ("model", "metric", "layer", "head")) -> pd.DataFrame:
        """:func:`probekit.results.summarize` of the filtered rows, from per-part moments merged."""
        by = tuple(by)
        pieces = []
        # only the columns grouped by: image names, the costliest column in pandas, are read only when asked for
        read = [c for c in ("image", "layer", "head") if c in by] + ["value", *self._extras(by)]
        for model, metric, t in self.iter_parts(read):
            t = t.assign(model=model, metric=metric)
            v = t["value"].to_numpy(dtype=np.float64)
            finite = np.isfinite(v)
            kept = t.assign(value=t["value"].where(finite), _bad=~finite)
            g = kept.groupby(list(by), observed=True, sort=False)
            s = g["value"].agg(mean="mean", var="var", n="count").reset_index()
            s["n_nonfinite"] = g["_bad"].sum().to_numpy().astype(np.int64)
            s["m2"] = (s["var"].fillna(0.0) * (s["n"] - 1)).where(s["n"] > 0, np.nan)
            pieces.append(s.drop(columns="var"))
        cols = [*by, "mean", "std", "n", "n_nonfinite", "ci_low", "ci_high"]
        if not pieces:
            return pd.DataFrame(columns=cols)
        stacked = pd.concat(pieces, ignore_index=True)
        merged = merge_moments(stacked, list(by)).astype({c: stacked[c].dtype for c in by if c not in _KEYS})
        merged = merged.sort_values(list(by), kind="stable").reset_index(drop=True)
        n = merged["n"].to_numpy().astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(merged["m2"].to_numpy(dtype=np.float64) / (n - 1))
        std[n < 2] = np.nan
        merged["std"], merged["n"] = std, n
        half = _t95(n) * std / np.sqrt(n)
        merged["ci_low"] = merged["mean"] - half
        merged["ci_high"] = merged["mean"] + half
        for col in ("model", "metric"):
            if col in merged:
                merged[col] = merged[col].astype(str).astype("category")
        return merged[cols]

    @staticmethod
    def _extras(by: tuple[str, ...]) -> list[str]:
        return [c for c in by if c not in ("model", "metric", "image", "layer", "head", "value")]

    def nonfinite(self) -> list[dict]:
        """:meth:`probekit.results.Results.nonfinite` of the table's rows, reading only the non-finite ones."""
        import pyarrow.compute as pc

        found: dict[tuple[str, str], dict] = {}
        bad_expr = pc.field("value").is_null() | ~pc.is_finite(pc.field("value"))  # (a NaN is written as null)
        for model, metric, bad in self.iter_parts(["image", "layer", "value"], where=bad_expr):
            if not len(bad):
                continue
            rec = found.setdefault((model, metric), {"model": model, "metric": metric, "values": 0, "of": 0,
                                                     "layers": set(), "images": {}})
            rec["values"] += len(bad)
            rec["layers"].update(int(i) for i in bad["layer"].unique())
            rec["images"].update(dict.fromkeys(bad["image"].astype(str)))
        out = []
        for (model, metric), rec in found.items():
            sizes = [p.rows for p in self.parts() if p.model == model and p.metric == metric]
            if not sizes or min(sizes) < 0:  # a single file, or a folder without index: count the rows
                sizes = [self._arrow(["value"], where=(pc.field("model") == model) & (pc.field("metric") == metric)
                                     ).num_rows]
            out.append({**rec, "of": int(sum(sizes)), "layers": sorted(rec["layers"]), "images": list(rec["images"])})
        return out

    def per_image_layer(self, metric: str, heads: bool | None = None) -> pd.Series:
        """``model x image x layer`` mean over heads of one metric, one part at a time
        (:func:`probekit.views.contrasts.per_image_layer`, without every row in memory). ``heads``:
        whether the metric has per-head rows (only those are averaged then); None: looked up here."""
        import pyarrow.compute as pc

        scan = self.filter(metrics=[metric])
        if heads is None:
            heads = scan.has_heads()
        pieces = []
        for model, _, t in scan.iter_parts(["image", "layer", "head", "value"],
                                           where=(pc.field("head") >= 0) if heads else None):
            # sums and counts: a model's rows may span parts (one image's heads across two of them)
            g = t.groupby([t["image"].astype(str), "layer"], observed=True)["value"].agg(["sum", "count"])
            pieces.append(pd.concat({model: g}, names=["model"]))
        if not pieces:
            idx = pd.MultiIndex.from_arrays([[], [], []], names=["model", "image", "layer"])
            return pd.Series([], index=idx, dtype=np.float64, name="value")
        both = pd.concat(pieces)
        if both.index.has_duplicates:
            both = both.groupby(level=["model", "image", "layer"], sort=False).sum()
        out = (both["sum"] / both["count"]).rename("value")
        return out.sort_index(level=["model", "image", "layer"], sort_remaining=False)
