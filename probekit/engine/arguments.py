"""The arguments of :func:`probekit.engine.probe`, checked before any work, each failure one line.

Python callers pass what a run file's pydantic model would refuse: ``batch_size=0``,
``layers="12"`` (a string is iterable: it would probe layers 1 and 2), ``layers=[]`` (zero
rows and no error), ``device="gpu"``, ``metrics=None``. These checks run at the top of
:func:`probekit.engine.probe`, so such a call fails at once with a :class:`~probekit.errors.ConfigError`
that says what is expected, and never as a traceback from torch in the middle of a run.
"""

from __future__ import annotations

import numbers
from typing import Any

from probekit.errors import ConfigError

__all__ = ["check_probe_arguments", "positive_int", "layer_list"]


def positive_int(name: str, value: Any, *, zero: bool = False) -> int:
    """``value`` if it is a whole number > 0 (>= 0 with ``zero``), else a ConfigError naming ``name``."""
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        want = "a whole number >= 0" if zero else "a positive whole number"
        raise ConfigError(f"{name} must be {want}; got {value!r}.")
    return int(value)


def layer_list(layers: Any) -> list[int] | None:
    """``layers`` as a list of indices: None (all), one index, or an iterable of indices."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)):
        raise ConfigError(f"layers= takes layer indices such as [0, 11] (or one index, 11), not the string "
                          f"{layers!r}; a string would be read one character at a time.")
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        return [int(layers)]
    try:
        items = list(layers)
    except TypeError:
        raise ConfigError(f"layers= takes layer indices such as [0, 11]; got {type(layers).__name__}.") from None
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise ConfigError(f"layers= takes whole-number layer indices such as [0, 11]; got {bad[0]!r} in {items!r}.")
    if not items:
        raise ConfigError("layers=[] selects no layer, so nothing would be measured. Leave layers out for all "
                          "of them, or pass the indices you want.")
    return [int(i) for i in items]


def check_probe_arguments(*, model: Any, metrics: Any, batch_size: Any, layers: Any, device: Any,
                          num_workers: Any, block_mb: Any) -> list[int] | None:
    """Refuse what :func:`probekit.engine.probe` cannot run; returns ``layers`` as a list (or None).

    Images are checked by :func:`probekit.inputs.images.resolve_images`, which knows every accepted kind.
    """
    from probekit.adapter import ProbedModel

    if not isinstance(model, (ProbedModel, str)):
        raise ConfigError(f"model= takes a ProbedModel (from pk.load or pk.wrap) or an alias/spec string such as "
                          f"'timm:vit_small_patch16_224'; got {type(model).__name__}.")
    if metrics is None or (isinstance(metrics, (list, tuple, dict, set)) and not metrics):
        raise ConfigError(f"metrics={metrics!r} names no metric; pass at least one, e.g. metrics=['mad'] "
                          "(`probekit metrics` lists them).")
    positive_int("batch_size", batch_size)
    positive_int("num_workers", num_workers, zero=True)
    if block_mb is not None and (isinstance(block_mb, bool) or not isinstance(block_mb, numbers.Real)
                                 or block_mb <= 0):
        raise ConfigError(f"block_mb must be a positive number of MiB (or None for the default); got {block_mb!r}.")
    if device is not None:
        from probekit.models import device_problem

        problem = device_problem(device)
        if problem:
            raise ConfigError(problem)
    return layer_list(layers)
