"""From a name to a ProbedModel: aliases, specs (``backend:name``), and wrapping own modules."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

from torch import nn

from .adapter import ProbedModel
from .errors import ProbekitError, UnknownNameError, UnsupportedArchitectureError, WeightsUnavailableError
from .registry import adapters

__all__ = ["load", "wrap", "aliases", "resolve"]

_SPEC_HELP = (
    "A model is an alias from `probekit models` or a spec: hf:<repo id>, timm:<model name>, "
    "open_clip:<arch>/<pretrained tag>, onnx:<path>."
)


@lru_cache(maxsize=1)
def aliases() -> dict[str, dict[str, Any]]:
    """The aliases of configs/models.yaml: ``{alias: {spec, family, training, ...}}``."""
    import yaml

    text = resources.files("probekit.configs").joinpath("models.yaml").read_text()
    table = yaml.safe_load(text) or {}
    return {name: dict(entry, alias=name) for name, entry in table.items()}


def resolve(name: str, **options: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(spec, options, metadata)`` for an alias or a spec; explicit options win."""
    table = aliases()
    if name in table:
        entry = dict(table[name])
        spec = entry.pop("spec")
        opts = {**entry.pop("options", {}), **options}
        return spec, opts, entry
    if ":" not in name:
        raise UnknownNameError("model", name, table, hint=_SPEC_HELP)
    return name, dict(options), {}


def load(name: str, *, label: str | None = None, device=None, dtype=None, **options: Any) -> ProbedModel:
    """Load a model by alias or spec, with its own preprocessing.

    Args:
        name: an alias (``"dino-s16"``) or a spec (``"timm:vit_small_patch16_224"``).
        label: how results name the model (default: the alias or spec).
        device, dtype: where to put the weights.
        **options: backend options: ``pretrained=False`` (random init, a control),
            ``checkpoint=<local file>``, ``image_size=...``.

    Raises:
        UnknownNameError: unknown alias, backend or model (close names are listed).
        WeightsUnavailableError: pretrained weights not on this machine.
    """
    spec, opts, meta = resolve(name, **options)
    prefix, _, rest = spec.partition(":")
    if prefix not in adapters:
        raise UnknownNameError("backend", prefix, adapters.names(), hint=_SPEC_HELP)
    try:
        adapter = adapters.get(prefix).from_spec(rest, **opts)
    except WeightsUnavailableError as exc:
        if "install" in meta:  # the alias knows the one command that brings its weights
            raise WeightsUnavailableError(f"{exc} For the alias {name!r}: `{meta['install']}`.") from exc
        raise
    if device is not None or dtype is not None:
        adapter.to(device, dtype)
    if opts.get("pretrained", True) is False:
        meta["pretrained"] = False
    return ProbedModel(adapter, spec=spec, label=label or name, options=opts, **meta)


def wrap(module: nn.Module, *, label: str | None = None, **options: Any) -> ProbedModel:
    """Bind your own ``nn.Module`` (e.g. a fine-tuned ViT); the adapter is picked from its classes.

    Raises:
        UnsupportedArchitectureError: no registered adapter understands the module.
    """
    tried = []
    for name in adapters.names():
        try:
            cls = adapters.get(name)
        except ProbekitError:  # a broken or absent plugin must not stop the others from wrapping
            tried.append(f"{name} (failed to load)")
            continue
        tried.append(name)
        if cls.can_wrap(module):
            adapter = cls.from_module(module, **options)
            spec = f"{name}:<{type(module).__name__}>"
            return ProbedModel(adapter, spec=spec, label=label or type(module).__name__)
    raise UnsupportedArchitectureError(
        f"No adapter understands a {type(module).__module__}.{type(module).__name__} (tried: "
        f"{', '.join(tried)}). Write one: subclass probekit.Adapter (from_module, can_wrap, layout, "
        "tap, num_layers, num_heads), register it under the 'probekit.adapters' entry point, and "
        "prove it with probekit.testing.check_adapter."
    )
