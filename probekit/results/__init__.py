"""Results: the long table of per-image values, map arrays, and provenance.

One row per model x image x layer x head x metric (``head = -1`` for values that are not per
head). Every image's value is kept, so any comparison carries a confidence interval over
images. Map metrics (values with further axes) live in ``arrays`` keyed ``"model/metric"``,
shaped ``[images, layers, ...]``. Parquet and CSV round-trip without loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probekit._io.atomic import atomic_path, write_text_atomic
from probekit.inputs.view import join_arrays
from probekit.results.dataset import ResultsScan
from probekit.results.table import (  # the table's columns and summary, re-exported here
    _META_KEY,
    COLUMNS,
    _typed,
    long_table,
    summarize,
)

__all__ = ["Results", "COLUMNS", "summarize", "models_meta", "long_table"]

_MODEL_KEYS = ("spec", "adapter", "layout", "geometry", "training", "model_meta", "dtype", "device")


def models_meta(parts: list[Results]) -> dict[str, dict]:
    """``{model: {spec, adapter, layout, training, model_meta, dtype, device}}`` from parts'
    metadata (the first part of each model names it): the one per-model record of a table."""
    out: dict[str, dict] = {}
    for p in parts:
        if "model" in p.meta:
            out.setdefault(p.meta["model"], {k: p.meta.get(k) for k in _MODEL_KEYS})
    return out


class Results:
    """What :func:`probekit.engine.probe` returns.

    Attributes:
        table: the long table (:data:`COLUMNS`).
        arrays: ``{"model/metric": ndarray [images, layers, ...]}`` for map metrics.
        meta: provenance (specs, options, image fingerprint, versions, timings).
    """

    _scan: Any = None  # a ResultsScan the table is read from when first asked for (a run's dataset)
    _table: pd.DataFrame | None = None

    def __init__(self, table: pd.DataFrame, arrays: dict[str, np.ndarray] | None = None, meta: dict | None = None):
        self.table = _typed(table) if len(table.columns) else pd.DataFrame(columns=COLUMNS)
        self.arrays = dict(arrays or {})
        self.meta = dict(meta or {})

    @property
    def table(self) -> pd.DataFrame:
        """The long table; of results opened from a dataset (:meth:`scan`, a run), read on first use."""
        if self._table is None:
            self._table = self._scan.to_results().table if self._scan is not None else pd.DataFrame(columns=COLUMNS)
        return self._table

    @table.setter
    def table(self, value: pd.DataFrame) -> None:
        self._table = value

    @classmethod
    def scan(cls, path, *, models: list[str] | None = None, metrics: list[str] | None = None,
             layers: list[int] | None = None) -> Any:
        """A run's results opened lazily (:class:`probekit.results.dataset.ResultsScan`): filter by
        ``models``, ``metrics`` and ``layers`` (or ``.filter(...)``), then ``.to_results()``,
        ``.summary()``, ``.to_arrow()`` read only what is asked for.

        ``path``: a run directory, its ``results.parquet`` folder, or a single-file
        ``results.parquet`` of an earlier version. (A run directory's manifest is checked by
        :func:`probekit.runs.rundir.load_run_dir`, not here.)
        """
        return ResultsScan(path, models=models, metrics=metrics, layers=layers)

    @classmethod
    def _lazy(cls, scan: Any, arrays: dict[str, np.ndarray] | None = None, meta: dict | None = None) -> Results:
        """Results whose table is ``scan``'s rows, read only when ``table`` is used; its summary,
        non-finite values, models and metrics come from the scan without reading every row."""
        res = cls.__new__(cls)
        res._scan, res._table = scan, None
        res.arrays, res.meta = dict(arrays or {}), dict(meta or {})
        return res

    @classmethod
    def _of_long_table(cls, table: pd.DataFrame, arrays: dict[str, np.ndarray] | None = None,
                       meta: dict | None = None) -> Results:
        """Results of a table that :func:`long_table` made (the engine's), taken as it is: it is in its
        column types by construction, and even checking that (:func:`_is_typed`) costs a visible share
        of a small :func:`probekit.probe` call (issue 25). Sets what ``__init__`` sets."""
        res = cls.__new__(cls)
        res.table, res.arrays, res.meta = table, dict(arrays or {}), dict(meta or {})
        return res

    # -- views -----------------------------------------------------------------------------
    @property
    def source(self) -> Any:
        """The :class:`~probekit.results.dataset.ResultsScan` the rows are read from while they are
        on disk only (results of a run, :func:`probekit.runs.rundir.load_run_dir`), else None."""
        return self._scan if self._table is None else None

    @property
    def columns(self) -> list[str]:
        """The table's column names (of results on disk, without reading a row)."""
        if self.source is not None:
            return self.source.columns
        return list(self.table.columns)

    def rows(self, metric: str | None = None, models: list[str] | None = None) -> pd.DataFrame:
        """The rows of one ``metric`` (and ``models``), in table order; of results on disk, only
        those are read."""
        if self.source is not None:
            scan = self.source.filter(models=models, metrics=None if metric is None else [metric])
            return scan.to_results().table
        t = self.table
        keep = np.ones(len(t), dtype=bool)
        if metric is not None:
            keep &= (t["metric"].astype(str) == metric).to_numpy()
        if models is not None:
            keep &= t["model"].astype(str).isin(models).to_numpy()
        return t[keep]

    @property
    def models(self) -> list[str]:
        if self._table is None and self._scan is not None:
            return self._scan.models
        return list(dict.fromkeys(self.table["model"].astype(str)))

    @property
    def metrics(self) -> list[str]:
        if self._table is None and self._scan is not None:
            return self._scan.metrics
        return list(dict.fromkeys(self.table["metric"].astype(str)))

    def summary(self, by=("model", "metric", "layer", "head")) -> pd.DataFrame:
        """Mean and 95% CI over images per model x metric x layer x head."""
        if self._table is None and self._scan is not None:  # from per-part moments: not every row at once
            return self._scan.summary(tuple(by))
        return summarize(self.table, by)

    def nonfinite(self) -> list[dict]:
        """Where values are NaN or infinite: one record per model and metric, with the count,
        the layers and the images (and for map arrays, the count of non-finite entries)."""
        out = []
        if self._table is None and self._scan is not None:
            out = self._scan.nonfinite()
        else:
            t = self.table
            bad = t[~np.isfinite(t["value"].to_numpy(dtype=np.float64))]
            for (model, metric), g in bad.groupby(["model", "metric"], observed=True, sort=False):
                total = int(((t["model"] == model) & (t["metric"] == metric)).sum())
                out.append({"model": str(model), "metric": str(metric), "values": len(g), "of": total,
                            "layers": sorted(int(i) for i in g["layer"].unique()),
                            "images": list(dict.fromkeys(g["image"].astype(str)))})
        for key, arr in self.arrays.items():
            n = int(np.size(arr) - np.isfinite(arr).sum()) if np.issubdtype(arr.dtype, np.number) else 0
            if n:
                model, metric = key.rsplit("/", 1)
                out.append({"model": model, "metric": metric, "values": n, "of": int(np.size(arr)),
                            "layers": None, "images": None})
        return out

    def layer_means(self, metric: str = "mad") -> pd.DataFrame:
        """Per model and layer, the mean over heads and images (``model x layer`` frame)."""
        t = self.table[self.table["metric"] == metric]
        return t.groupby(["model", "layer"], observed=True)["value"].mean().unstack("layer")

    @classmethod
    def concat(cls, parts: list[Results]) -> Results:
        """One Results from several (models, batches or machines)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return cls(pd.DataFrame(columns=COLUMNS))
        table = pd.concat([p.table.astype({"model": str, "metric": str}) for p in parts], ignore_index=True)
        meta: dict[str, Any] = {"parts": [p.meta for p in parts]}
        # per-model layout/spec and the union of metric units, where plots look them up
        meta["models"] = models_meta(parts)
        meta["metrics"] = {k: v for p in parts for k, v in (p.meta.get("metrics") or {}).items()}
        pieces: dict[str, list] = {}
        for p in parts:
            for k, v in p.arrays.items():
                pieces.setdefault(k, []).append(v)
        arrays = {k: join_arrays(k, v) for k, v in pieces.items()}  # a model's input views once
        return cls(table, arrays, meta)

    def __len__(self) -> int:
        if self._table is None and self._scan is not None:  # counted from the files, never read
            return self._scan.count_rows()
        return len(self.table)

    def __repr__(self) -> str:
        return f"Results({len(self.table)} rows, models={self.models}, metrics={self.metrics})"

    def _repr_html_(self) -> str:
        """A header line and a small chart per metric (per-layer means, 95% CIs over images), for Jupyter."""
        return results_html(self)

    def plot(self, kind: str = "overlay", metric: str | None = None, *, ax: Any = None, **options: Any) -> Any:
        """One figure of these results, drawn with matplotlib; returns the ``Figure``.

        Args:
            kind: ``overlay`` (per-layer mean over heads, 95% CI band over images, a line per
                model), ``depth`` (ViT paper Fig. 7: a dot per head and layer), ``heatmap``
                (layer x head), ``summary`` (first, middle and last layer with CIs), ``labels``
                (a line per image label) or ``maps`` (map metrics over the images).
            metric: a metric label of these results (default ``mad``, else the first).
            ax: draw on this matplotlib axes instead of a new figure.
            **options: passed to the figure's function in :mod:`probekit.views.plots`
                (``models=[...]``; ``layers=[...]`` for ``summary``).

        Raises:
            ConfigError: an unknown kind or metric; ProbekitError: matplotlib or seaborn missing.

        >>> rows = [("m", f"i{i}", layer, 0, "mad", 10.0 * layer + i) for i in range(3) for layer in range(2)]
        >>> fig = Results(pd.DataFrame(rows, columns=COLUMNS)).plot("depth", "mad")   # then fig.savefig(...)
        >>> [(a.get_title(), a.get_xlabel()) for a in fig.axes]
        [('m', 'layer')]
        """
        from importlib import import_module

        return import_module(_VIEWS).plot(self, kind, metric, ax=ax, **options)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Results) and self.table.equals(other.table)

    # -- files -------------------------------------------------------------------------------
    def to_parquet(self, path) -> Path:
        """Write the table with provenance in the file's metadata (atomically)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        tbl = pa.Table.from_pandas(self.table, preserve_index=False)
        md = dict(tbl.schema.metadata or {})
        md[_META_KEY] = json.dumps(self.meta, default=str).encode()
        tbl = tbl.replace_schema_metadata(md)
        with atomic_path(path) as tmp:
            pq.write_table(tbl, tmp)
        return path

    @classmethod
    def read_parquet(cls, path) -> Results:
        """A table written by :meth:`to_parquet`, or a run's ``results.parquet`` folder (a dataset
        of part files, :mod:`probekit.results.dataset`), every row read.

        Raises:
            ConfigError: the file is not parquet, or not a probekit results table (columns missing
                or of the wrong kind).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        from probekit.errors import ConfigError

        what = ("Give a results.parquet of a run directory, or a file written by Results.to_parquet "
                f"(columns {', '.join(COLUMNS)}).")
        if Path(path).is_dir():
            try:
                return cls.scan(path).to_results()
            except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
                raise ConfigError(f"{path} cannot be read as a results dataset ({exc}). {what}") from None
        try:
            tbl = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(f"{path} cannot be read as parquet ({exc}). {what}") from None
        missing = [c for c in COLUMNS if c not in tbl.column_names]
        if missing:
            raise ConfigError(f"{path} is not a probekit results table: it lacks column(s) {', '.join(missing)}. "
                              f"{what}")
        meta = json.loads((tbl.schema.metadata or {}).get(_META_KEY, b"{}"))
        try:
            return cls(tbl.to_pandas(), meta=meta)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a probekit results table: {exc}. {what}") from None

    def to_csv(self, path) -> Path:
        """Write the table (17 significant digits: floats round-trip exactly) and a .json sidecar."""
        path = Path(path)
        with atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False, float_format="%.17g")
        write_text_atomic(path.with_suffix(".meta.json"), json.dumps(self.meta, indent=1, default=str))
        return path

    @classmethod
    def read_csv(cls, path) -> Results:
        path = Path(path)
        # names such as "NA" stay strings; an empty value is a NaN (e.g. head_similarity of one head)
        df = pd.read_csv(path, dtype={"model": str, "image": str, "metric": str}, keep_default_na=False,
                         na_values={"value": ["", "nan", "NaN"]})
        side = path.with_suffix(".meta.json")
        meta = json.loads(side.read_text()) if side.exists() else {}
        return cls(df, meta=meta)

    def save_arrays(self, path) -> Path | None:
        """Map arrays as one compressed .npz (atomically); None if there are none.

        The keys are stored verbatim, as a JSON list in the member ``__keys__`` (uint8), and the
        arrays as ``a0, a1, ...``: any model label round-trips (``__``, ``/``, spaces, unicode),
        and the file holds plain arrays only (readable without pickle).
        """
        if not self.arrays:
            return None
        path = Path(path)
        keys = list(self.arrays)
        members = {f"a{i}": np.asarray(self.arrays[k]) for i, k in enumerate(keys)}
        members[_KEYS] = np.frombuffer(json.dumps(keys).encode(), dtype=np.uint8)
        with atomic_path(path, suffix=".npz") as tmp:
            # numpy's stubs let **members fill allow_pickle (a bool); the keys are a0, a1, ... and _KEYS
            np.savez_compressed(tmp, **members)  # type: ignore[arg-type]
        return path

    @staticmethod
    def read_arrays(path, models: list[str] | None = None) -> dict[str, np.ndarray]:
        """Map arrays written by :meth:`save_arrays` (never unpickling anything).

        Args:
            models: the model labels, to read files written before the keys were stored (their
                member names encode ``/`` as ``__``, which only known labels disambiguate).

        Raises:
            ConfigError: the file is not such an arrays file.
        """
        import zipfile

        from probekit.errors import ConfigError

        what = f"{path} is not a probekit arrays file"
        try:
            with np.load(path, allow_pickle=False) as z:  # an object array (a pickle) is refused here
                if _KEYS not in z.files:  # written before the keys were stored
                    return {_legacy_key(k, models or []): z[k] for k in z.files}
                keys = json.loads(z[_KEYS].tobytes().decode())
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or \
                        sorted(z.files) != sorted([_KEYS, *(f"a{i}" for i in range(len(keys)))]):
                    raise ConfigError(f"{what} (its keys do not match its arrays).")
                return {k: z[f"a{i}"] for i, k in enumerate(keys)}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # ConfigError is a ValueError
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              "probekit reads plain arrays only. Run the comparison again to rewrite it.") from None


_KEYS = "__keys__"  # the member of an arrays file that lists its keys (JSON, as uint8)


def _legacy_key(name: str, models: list[str]) -> str:
    """A key of an arrays file that encoded ``/`` as ``__``: split after a known model label."""
    for model in sorted((m for m in models if isinstance(m, str) and m), key=len, reverse=True):
        enc = model.replace("/", "__") + "__"
        if name.startswith(enc) and len(name) > len(enc):
            return f"{model}/{name[len(enc):]}"
    return name.replace("__", "/")


# -- Jupyter -------------------------------------------------------------------------------------
# Drawing is the views' job (probekit.views.plots); results only name the module that draws, as
# pandas names its plotting backend, so this module needs neither matplotlib nor the view layer.
_VIEWS = "probekit.views.plots"


ResultsScan.results_type = Results  # what ResultsScan.to_results makes (that module cannot import this one)


def results_html(res: Results) -> str:
    """``Results`` as a header line and, per metric, a small chart of the per-layer means with their
    95% CIs over images (:func:`probekit.views.plots.notebook.results_html`)."""
    from importlib import import_module

    return import_module(f"{_VIEWS}.notebook").results_html(res)
