"""The long table's columns and types, built from the engine's arrays (:func:`long_table`), and its
per-group summary with a 95% t interval over images (:func:`summarize`)."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

__all__ = ["COLUMNS", "long_table", "summarize"]

COLUMNS = ["model", "image", "layer", "head", "metric", "value"]
_DTYPES = {"model": "category", "image": "string", "layer": "int16", "head": "int16", "metric": "category"}
_META_KEY = b"probekit"


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    if _is_typed(df):  # e.g. the engine's own table (long_table): converting again changes nothing
        return df
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)
    for col, dt in _DTYPES.items():
        df[col] = df[col].astype(str).astype(dt) if dt in ("category", "string") else df[col].astype(dt)
    df["value"] = df["value"].astype("float64")
    return df


#: what ``astype(str)`` makes of strings on this pandas ('str' from pandas 3, object before), and
#: ``astype("string")`` after it: the dtypes of a typed table's category labels and image names
_STR = pd.Series(["x"], dtype=object).astype(str).dtype
_STRING = pd.Series(["x"], dtype=object).astype(str).astype("string").dtype


def _is_typed(df: pd.DataFrame) -> bool:
    """Whether :func:`_typed` would give ``df`` back unchanged: the columns in order from a fresh
    index, each already of its type, category labels as ``astype(str).astype("category")`` makes
    them (strings, sorted, each used, none missing) and no missing image name (``astype(str)``
    would write it as text). Why: converting a typed table costs milliseconds of pandas calls,
    a visible share of a small :func:`probekit.probe` call (issue 25); so do pandas' own checks
    (hash tables for uniqueness and order), hence plain Python on the few labels."""
    index, columns = df.index, list(df.columns)
    if (columns[: len(COLUMNS)] != COLUMNS or len(set(columns)) != len(columns)
            or not isinstance(index, pd.RangeIndex) or index.start != 0 or index.step != 1):
        return False
    dtypes = dict(zip(columns, df.dtypes, strict=True))
    if (dtypes["layer"] != np.int16 or dtypes["head"] != np.int16 or dtypes["value"] != np.float64
            or dtypes["image"] != _STRING):
        return False
    for col in ("model", "metric"):
        dt = dtypes[col]
        if not isinstance(dt, pd.CategoricalDtype) or dt.ordered or dt.categories.dtype != _STR:
            return False
        cats = dt.categories.tolist()
        if not all(isinstance(c, str) for c in cats) or cats != sorted(set(cats)):
            return False
        codes = df[col].array.codes
        if (codes < 0).any() or (len(codes) and np.bincount(codes, minlength=len(cats)).min() == 0):
            return False
    return not df["image"].array.isna().any()


@functools.lru_cache(maxsize=64)
def _categories(labels: tuple[str, ...]) -> pd.CategoricalDtype:
    """The category type of sorted, distinct ``labels`` (made once: pandas checks them on every build)."""
    return pd.CategoricalDtype(pd.Index(list(labels), dtype=_STR))


def long_table(model: str, names: np.ndarray, layer: np.ndarray, head: np.ndarray, labels: list[str],
               metric: np.ndarray, value: np.ndarray) -> pd.DataFrame:
    """The long table (:data:`COLUMNS`) built in its column types at once (:func:`_typed` then leaves
    it as it is): one row per entry of the equal-length arrays ``names`` (image names), ``layer``,
    ``head``, ``metric`` (indices into ``labels``, the metric labels) and ``value``.

    >>> t = long_table("m", np.array(["a", "b"], dtype=object), np.array([0, 0]), np.array([-1, -1]),
    ...                ["mad"], np.array([0, 0]), np.array([1.0, 2.0]))
    >>> _is_typed(t), list(t.dtypes.astype(str))
    (True, ['category', 'string', 'int16', 'int16', 'category', 'float64'])
    """
    rows = len(value)
    sorted_labels = sorted(set(labels))
    where = np.array([sorted_labels.index(label) for label in labels], dtype=np.int64)
    # every column a fresh array (np.array copies): the frame takes them as they are and shares nothing
    # with the caller's arrays
    cols = [pd.Categorical.from_codes(np.zeros(rows, dtype=np.int8), dtype=_categories((str(model),))),
            pd.array(np.asarray(names, dtype=object).astype(str), dtype=_STRING),  # the dtype, not its name
            np.array(layer, dtype=np.int16),
            np.array(head, dtype=np.int16),
            pd.Categorical.from_codes(where[np.asarray(metric, dtype=np.int64)],
                                      dtype=_categories(tuple(sorted_labels))),
            np.array(value, dtype=np.float64)]
    if _FROM_ARRAYS is not None and all(c.ndim == 1 and len(c) == rows for c in cols):
        # columns already checked and in their types: pandas' own checks and copies skipped (issue 25)
        return _FROM_ARRAYS(cols, columns=pd.Index(COLUMNS), index=pd.RangeIndex(rows), verify_integrity=False)
    return pd.DataFrame(dict(zip(COLUMNS, cols, strict=True)), copy=False)  # raises on unequal lengths


#: ``DataFrame._from_arrays`` (pandas 0.23 to 3 at least): a frame of checked columns without the checks of
#: ``DataFrame(dict)`` (~0.1 ms of a small probe call, issue 25); the public constructor where it is missing
_FROM_ARRAYS = getattr(pd.DataFrame, "_from_arrays", None)


def _t95(n: np.ndarray) -> np.ndarray:
    """Two-sided 95% Student t quantile for n - 1 degrees of freedom (NaN for a single image)."""
    from scipy import stats  # scipy comes with seaborn

    out = np.full(n.shape, np.nan)
    ok = n > 1
    out[ok] = stats.t.ppf(0.975, n[ok] - 1)
    return out


def summarize(table: pd.DataFrame, by=("model", "metric", "layer", "head")) -> pd.DataFrame:
    """Mean, standard deviation, count and 95% CI (t) over images for each group.

    ``n`` counts the finite values the statistics use; ``n_nonfinite`` the NaN and infinite
    values left out, so a group never shrinks silently.
    """
    finite = np.isfinite(table["value"].to_numpy(dtype=np.float64))
    kept = table.assign(value=table["value"].where(finite), _bad=~finite)
    g = kept.groupby(list(by), observed=True, sort=True)
    out = g["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["n_nonfinite"] = g["_bad"].sum().to_numpy().astype(np.int64)
    half = _t95(out["n"].to_numpy()) * out["std"].to_numpy() / np.sqrt(out["n"].to_numpy())
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    return out
