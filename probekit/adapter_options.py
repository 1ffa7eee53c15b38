"""Model options: each adapter declares the options it takes, checked by type before any model loads.

A model option reaches a backend from a run file (``options: {pretrained: false}``), the
command line (``--option k=v``) or ``pk.load(spec, **options)``. Without a declared type a
quoted ``"false"`` is truthy (pretrained weights silently replace a random-init control) and a
misspelled key fails deep inside the library with a raw ``TypeError``. So every adapter class
names a pydantic model, :attr:`probekit.Adapter.options_schema`, derived from
:class:`AdapterOptions` (``pretrained``, ``checkpoint``, ``image_size``), and
:func:`check_model_options` validates against it in :func:`probekit.runs.config.check_run` and in
:func:`probekit.load`, so both say what is wrong and which options the backend takes.

Backends that pass further keywords to their library (timm's model classes, open_clip's
``create_model``) declare those names through :meth:`AdapterOptions.passthrough`; a key outside
the fields and that set is refused, and a passthrough whose library default is a bool is read
as a bool (``"false"`` is False).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from probekit.errors import ConfigError, close_matches

__all__ = ["AdapterOptions", "check_model_options", "options_problems", "describe_options", "library_keywords"]

class AdapterOptions(BaseModel):
    """Options every backend understands. Subclass to add an adapter's own (a typed field each).

    Booleans are strict, as metric options are (:mod:`probekit.metric.options`): ``true`` or
    ``false`` unquoted; ``"false"``, ``no`` or ``maybe`` are refused, never read as true.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    pretrained: StrictBool = Field(True, description="load pretrained weights (false: random init, a control)")
    checkpoint: str | None = Field(None, description="a local weights file")
    image_size: int | tuple[int, int] | None = Field(None, description="input size: H or [H, W]")

    #: what a key outside the fields and :meth:`passthrough` means, in words (for messages)
    passthrough_help: ClassVar[str] = ""

    @classmethod
    def passthrough(cls) -> dict[str, type | None]:
        """Extra keyword names handed to the library, with a type to read them as (or None)."""
        return {}

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint_is_a_file(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, (str, Path)):
            raise ValueError(f"checkpoint must be the path of a local weights file, not {type(v).__name__}")
        if not Path(v).expanduser().is_file():
            raise ValueError(f"checkpoint {str(v)!r} is not a file; give the path of a local weights file")
        return str(v)

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, v: Any) -> Any:
        sizes = (v,) if isinstance(v, int) else (v or ())
        if any(s <= 0 for s in sizes):
            raise ValueError(f"image_size must be positive pixels, H or [H, W]; got {v}")
        return v


def library_keywords(*functions: Any, skip: tuple[str, ...] = ()) -> dict[str, type | None]:
    """Keyword names of a library's functions (what a backend passes through), each typed as a
    strict bool where its default is a bool (so ``"false"`` is refused, not read as true), else untyped."""
    import inspect

    out: dict[str, type | None] = {}
    for fn in functions:
        for name, p in inspect.signature(fn).parameters.items():
            if name in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            if out.get(name) is None:
                out[name] = StrictBool if isinstance(p.default, bool) else None
    return out


def _unknown_key(schema: type[AdapterOptions], key: str) -> str:
    near = close_matches(str(key), [*schema.model_fields, *schema.passthrough()])
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return f"unknown option {key!r}{hint}"


def describe_options(schema: type[AdapterOptions]) -> str:
    """``pretrained: bool (...) = True; checkpoint: str; ...``: what a backend takes (as
    :func:`probekit.metric.options.describe_options` says a metric's), for messages."""
    from probekit.errors import describe_type

    parts = []
    for name, f in schema.model_fields.items():
        ann = describe_type(f.annotation).replace(" or None", "")
        default = "" if f.default is None else f" = {f.default!r}"
        parts.append(f"{name}: {'any' if f.annotation is Any else ann}{default}")
    if schema.passthrough_help:
        parts.append(schema.passthrough_help)
    return "; ".join(parts)


def _read_passthrough(schema: type[AdapterOptions], data: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Passthrough keys read as their declared type; (values, problems)."""
    from pydantic import TypeAdapter

    types, out, problems = schema.passthrough(), {}, []
    for k, v in data.items():
        t = types.get(k)
        if t is None or k in schema.model_fields:
            out[k] = v
            continue
        try:
            out[k] = TypeAdapter(t).validate_python(v)
        except ValidationError as exc:
            problems.append((k, f"{exc.errors(include_url=False)[0]['msg']} (got {v!r})"))
    return out, problems


def options_problems(adapter_cls: Any, options: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``(validated options, [(key, problem), ...])`` for ``options`` given to ``adapter_cls``.

    The validated options keep only what was given (defaults stay the adapter's), with values
    converted to their declared types.
    """
    schema: type[AdapterOptions] = getattr(adapter_cls, "options_schema", AdapterOptions)
    extra = schema.passthrough()
    # pydantic would say only "Extra inputs are not permitted": name each unknown key and its near misses
    unknown = [(str(k), _unknown_key(schema, k)) for k in options if k not in schema.model_fields and k not in extra]
    rest, problems = _read_passthrough(
        schema, {k: v for k, v in options.items() if k in extra and k not in schema.model_fields})
    problems = unknown + problems
    try:
        model = schema.model_validate({k: v for k, v in options.items() if k in schema.model_fields})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function", "tuple", "int")))
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            if key and err["type"] != "value_error" and not isinstance(got, dict):
                msg += f" (got {got!r})"
            problems.insert(len(unknown), (key, msg))
        return dict(options), problems
    if problems:
        return dict(options), problems
    declared = {k: v for k, v in model.model_dump().items() if k in options}
    return {**declared, **rest}, problems


def check_model_options(adapter_cls: Any, options: dict[str, Any], *, spec: str = "") -> dict[str, Any]:
    """Validated ``options`` for ``adapter_cls``, or a :class:`ConfigError` naming each bad key.

    >>> from probekit.adapter_options import AdapterOptions
    >>> class A:
    ...     name, options_schema = "demo", AdapterOptions
    >>> check_model_options(A, {"pretrained": False})
    {'pretrained': False}
    >>> try: check_model_options(A, {"colour": "blue"})  # doctest: +NORMALIZE_WHITESPACE
    ... except ConfigError as e: print(e)
    Bad option for demo: unknown option 'colour'. Valid options: pretrained: bool (true or false, unquoted) = True;
    checkpoint: str; image_size: int or a list of int.
    """
    opts, problems = options_problems(adapter_cls, options)
    if problems:
        raise ConfigError(options_message(adapter_cls, problems, spec))
    return opts


def options_message(adapter_cls: Any, problems: list[tuple[str, str]], spec: str = "") -> str:
    """One line: every bad key of one model, and what the backend takes."""
    schema = getattr(adapter_cls, "options_schema", AdapterOptions)
    what = spec or getattr(adapter_cls, "name", "") or adapter_cls.__name__
    bad = "; ".join(f"{k}: {m}" if k and not m.startswith("unknown option") else m for k, m in problems)
    s = "s" * (len(problems) != 1)
    end = "" if bad.endswith(".") else "."
    return f"Bad option{s} for {what}: {bad}{end} Valid options: {describe_options(schema)}."
