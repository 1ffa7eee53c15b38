"""Declared metric state (after torchmetrics' ``add_state``): what a metric accumulates, and how two
partial states combine.

A metric declares each piece of state once, with its default and how to reduce two copies::

    self.add_state("hits", default=torch.zeros(()), reduce="sum")
    self.add_state("values", default={}, reduce="cat")          # {layer: [tensors]}

From the declarations the base class writes reset, merge and state_dict once
for every metric. Why: sharded, resumed and distributed runs combine partial results through
exactly this state, so state a metric keeps anywhere else is lost when runs combine (the
conformance kit checks that nothing else changes between batches).

Reductions (a closed set):

- ``sum``: ``a + b`` (tensors, numbers);
- ``cat``: lists joined in order (per-image values, kept in order seen);
- ``max`` / ``min``: elementwise;
- ``same``: both sides must agree (or one is empty), e.g. the layer order of a matrix.

A ``dict`` default makes a keyed state (e.g. per layer): each key reduces on its own.
``None`` as a value means "nothing yet" and takes the other side.

A state stored in a file (the Ray engine's shard parts) is plain JSON (:func:`state_to_json`):
tensors as dtype, shape and base64 bytes, never a pickle, so reading a planted file back
(:func:`state_from_json`) runs no code; anything else is refused.
"""

from __future__ import annotations

import base64
import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from probekit.errors import ConfigError

__all__ = ["REDUCTIONS", "reduce_values", "state_to_json", "state_from_json"]


def _same(a: Any, b: Any) -> Any:
    if _equal(a, b):
        return a
    raise ConfigError(f"cannot merge states that must agree: {a!r} and {b!r}")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and bool(torch.equal(a, b)))
    return a == b


def _elementwise(fn: Callable) -> Callable:
    def op(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return fn(torch.as_tensor(a), torch.as_tensor(b))
        return {torch.maximum: max, torch.minimum: min}[fn](a, b)
    return op


REDUCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": lambda a, b: a + b,
    "cat": lambda a, b: list(a) + list(b),
    "max": _elementwise(torch.maximum),
    "min": _elementwise(torch.minimum),
    "same": _same,
}


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, (list, dict)) and not v)


def reduce_values(reduce: str, a: Any, b: Any) -> Any:
    """``a`` combined with ``b`` (neither changed); a dict reduces per key, an empty side takes the other."""
    if _empty(b):
        return copy.deepcopy(a)
    if _empty(a):
        return copy.deepcopy(b)
    if isinstance(a, dict) and isinstance(b, dict):
        out = copy.deepcopy(a)
        for k, v in b.items():
            out[k] = reduce_values(reduce, out[k], v) if k in out else copy.deepcopy(v)
        return out
    return REDUCTIONS[reduce](a, b)


# -- a state as plain JSON ---------------------------------------------------------------------------
_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
           "complex64", "complex128")  # what a stored tensor or array may hold: numbers, never objects


def _array_json(kind: str, a: np.ndarray, dtype: str) -> dict:
    return {kind: {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}}


def state_to_json(value: Any) -> Any:
    """``value`` (a state_dict, or a list of them) as JSON: numbers, strings, lists, and objects
    tagged ``tensor``, ``ndarray``, ``tuple`` or ``dict`` (whose keys may be numbers).

    Raises:
        TypeError: a value of another kind (a metric keeping state the contract does not allow).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"a metric state tensor of dtype {dtype} cannot be stored")
        return _array_json("tensor", (t.view(torch.int16) if dtype == "bfloat16" else t).numpy(), dtype)
    if isinstance(value, np.ndarray):
        if value.dtype.name not in _DTYPES:
            raise TypeError(f"a metric state array of dtype {value.dtype} cannot be stored")
        return _array_json("ndarray", np.ascontiguousarray(value), value.dtype.name)
    if isinstance(value, np.generic):
        return state_to_json(value.item())
    if isinstance(value, list):
        return [state_to_json(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [state_to_json(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[state_to_json(k), state_to_json(v)] for k, v in value.items()]}
    raise TypeError(f"a metric state value of type {type(value).__name__} cannot be stored (allowed: tensors, "
                    "arrays, numbers, strings, None, and lists, tuples and dicts of them)")


def _array_from_json(kind: str, rec: Any) -> Any:
    if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data"} or rec["dtype"] not in _DTYPES \
            or not isinstance(rec["shape"], list) or not all(type(n) is int and n >= 0 for n in rec["shape"]) \
            or not isinstance(rec["data"], str):
        raise ValueError(f"a malformed {kind}")
    dtype = rec["dtype"]
    raw = base64.b64decode(rec["data"], validate=True)
    np_dtype = np.dtype("int16" if dtype == "bfloat16" else dtype)
    if len(raw) != math.prod(rec["shape"]) * np_dtype.itemsize:
        raise ValueError(f"a {kind} whose bytes do not fill its shape")
    a = np.frombuffer(raw, dtype=np_dtype).reshape(rec["shape"]).copy()
    if kind == "ndarray":
        return a
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _from_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag in ("tensor", "ndarray"):
            return _array_from_json(tag, body)
        if tag == "tuple" and isinstance(body, list):
            return tuple(_from_json(v) for v in body)
        if tag == "dict" and isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
            out = {}
            for k, v in body:
                k = _from_json(k)
                if not isinstance(k, (bool, int, float, str, type(None))):
                    raise ValueError(f"a dict key of type {type(k).__name__}")
                out[k] = _from_json(v)
            return out
    raise ValueError(f"a value that is not a stored state ({str(value)[:60]!r})")


def state_from_json(value: Any) -> Any:
    """What :func:`state_to_json` wrote, back (tensors as tensors); nothing else is accepted.

    Raises:
        ConfigError: ``value`` is not such JSON (a planted or damaged file); nothing of it ran.
    """
    try:
        return _from_json(value)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"Stored metric state cannot be read: {exc}.") from None
