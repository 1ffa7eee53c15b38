"""Declared metric state (after torchmetrics' ``add_state``): what a metric accumulates, and how two
partial states combine.

A metric declares each piece of state once, with its default and how to reduce two copies::

    self.add_state("hits", default=torch.zeros(()), reduce="sum")
    self.add_state("values", default={}, reduce="cat")          # {layer: [tensors]}

From the declarations the base class writes reset, merge, state_dict and load_state_dict once
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
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .errors import ConfigError

__all__ = ["REDUCTIONS", "reduce_values"]


def _same(a: Any, b: Any) -> Any:
    if _equal(a, b):
        return a
    raise ConfigError(f"cannot merge states that must agree: {a!r} and {b!r}")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
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
