"""Declared metric options: class-level typed attributes, validated by pydantic.

A metric's options are the annotated class attributes that are not ``ClassVar`` (as in a
dataclass)::

    class Gini(Metric):
        name = "gini"
        renormalize: bool = False
        units: Literal["px", "patch"] = "px"
        radius: Annotated[int, Field(ge=1)] = 1

Why declared: an option the framework cannot see is an option the cache cannot see. Every
declared option is validated by type (strictly: ``"false"`` is not a bool, ``"maybe"`` is not
one of the allowed values), reported by :meth:`~probekit.Metric.options`, part of the
metric's label and of the part cache key, and passed back by ``type(m)(**m.options())``.
Lists are accepted where a tuple is declared (YAML and JSON have no tuples).
"""

from __future__ import annotations

import functools
import typing
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import ConfigDict, ValidationError
from pydantic_core import PydanticUndefined

from probekit.errors import ConfigError, describe_type

__all__ = [
    "declared_options", "validate_options", "defaults", "format_label", "describe_options", "describe_type",
    "alternatives",
]


def _is_classvar(tp: Any) -> bool:
    return tp is ClassVar or typing.get_origin(tp) is ClassVar


@functools.cache
def declared_options(cls: type) -> dict[str, tuple[Any, Any]]:
    """``{option: (type, default)}`` of a metric class, base classes first.

    Annotated class attributes that are not ``ClassVar`` and do not start with ``_``; the
    default is the class attribute (an option without a default is required).
    """
    out: dict[str, tuple[Any, Any]] = {}
    for klass in reversed(cls.__mro__):
        own = klass.__dict__.get("__annotations__", {})
        if not own:
            continue
        hints = _hints(klass)
        for key in own:
            tp = hints.get(key)
            if key.startswith("_") or tp is None or _is_classvar(tp):
                continue
            out[key] = (tp, klass.__dict__.get(key, ...))
    return out


def _hints(klass: type) -> dict[str, Any]:
    """Resolved annotations of one class. Under ``from __future__ import annotations`` they are
    strings, resolved in the class's module; ``typing``'s and pydantic's names are found even when
    that module does not import them (a class written in a doctest or a function)."""
    try:
        return typing.get_type_hints(klass, include_extras=True)
    except NameError:
        fallback = {**vars(typing), "Field": pydantic.Field, "AfterValidator": pydantic.AfterValidator}
        try:
            return typing.get_type_hints(klass, localns=fallback, include_extras=True)
        except NameError as exc:
            raise TypeError(
                f"cannot resolve the option annotations of {klass.__qualname__} ({exc}); import the names "
                "they use at the top of the class's module"
            ) from None


@functools.cache
def _model(cls: type) -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {key: (tp, default) for key, (tp, default) in declared_options(cls).items()}
    return pydantic.create_model(
        f"{cls.__name__}Options", __config__=ConfigDict(strict=True, extra="forbid", frozen=True), **fields
    )


def _base(tp: Any) -> Any:
    """``Annotated[T, ...]`` -> ``T``."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def describe_options(cls: type) -> str:
    """``renormalize: bool (...) = False; units: one of 'px', 'patch' = 'px'`` (or ``none``)."""
    opts, dflt = declared_options(cls), defaults(cls)
    if not opts:
        return "none"
    return "; ".join(
        f"{key}: {describe_type(tp)}" + (f" = {dflt[key]!r}" if key in dflt else " (required)")
        for key, (tp, _) in opts.items()
    )


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def validate_options(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """All of ``cls``'s options, defaults filled in and ``given`` checked; or one :class:`ConfigError`.

    The error names the metric, the option, the value, its type and allowed values, and lists
    the metric's options.
    """
    name = getattr(cls, "name", "") or cls.__name__
    opts = declared_options(cls)
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise ConfigError(
            f"Metric {name!r} has no option {', '.join(map(repr, unknown))}. "
            f"Its options: {describe_options(cls)}."
        )
    try:
        model = _model(cls)(**{k: _tupled(v) for k, v in given.items()})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        tp = opts.get(key, (Any, None))[0]
        got = given.get(key, "(missing)")
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"Metric {name!r}: option {key}={got!r} is invalid ({msg}); {key} must be {describe_type(tp)}. "
            f"Its options: {describe_options(cls)}."
        ) from None
    return {k: getattr(model, k) for k in opts}


def defaults(cls: type) -> dict[str, Any]:
    """The declared defaults (options without one are left out)."""
    out = {}
    for key, (_, default) in declared_options(cls).items():
        d = default.default if isinstance(default, pydantic.fields.FieldInfo) else default
        if d is not ... and d is not PydanticUndefined:
            out[key] = d
    return out


def format_label(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``name`` plus the options that differ from ``defaults``, sorted: ``mad[units=patch]``."""
    diff = {k: v for k, v in options.items() if defaults.get(k, object()) != v}
    if not diff:
        return name
    return f"{name}[" + ",".join(f"{k}={v}" for k, v in sorted(diff.items())) + "]"


def alternatives(cls: type, key: str, value: Any) -> list[Any]:
    """Other valid values of option ``key`` than ``value`` (for the conformance kit).

    From the type (a flipped bool, the other literals, nearby numbers) and the field's
    ``examples`` (``Field(examples=[...])``: how an author names a value the type cannot).
    """
    tp, default = declared_options(cls)[key]
    cands: list[Any] = []
    if isinstance(default, pydantic.fields.FieldInfo):
        cands += list(default.examples or [])
    for meta in typing.get_args(tp)[1:] if typing.get_origin(tp) is typing.Annotated else ():
        if isinstance(meta, pydantic.fields.FieldInfo):
            cands += list(meta.examples or [])
    base = _base(tp)
    if base is bool:
        cands.append(not value)
    elif typing.get_origin(base) is Literal:
        cands += list(typing.get_args(base))
    elif base in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        cands += [base(value + 1), base(value * 2), base(value - 1)]
    out = []
    for c in cands:
        try:
            v = validate_options(cls, {key: c})[key]
        except ConfigError:
            continue
        if v != value and v not in out:
            out.append(v)
    return out
