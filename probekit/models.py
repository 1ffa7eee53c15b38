"""From a name to a ProbedModel: aliases, specs (``backend:name``), and wrapping own modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from probekit.adapter import Adapter, ProbedModel, eval_mode
from probekit.adapter_options import check_model_options
from probekit.errors import (
    ConfigError,
    MissingDependencyError,
    ProbekitError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)
from probekit.model_aliases import aliases, backend_problem, resolve
from probekit.registry import adapters, install_command

__all__ = ["load", "wrap", "aliases", "resolve", "adapter_class", "device_problem"]


def device_problem(device: Any) -> str | None:
    """Why ``device`` cannot run models here, or None (checked before loading anything)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"{device!r} is not a device; use cpu, cuda, cuda:N or mps."
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"device {str(device)!r} asked for, but torch sees no CUDA GPU here; use cpu."
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"device {str(device)!r} asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)."
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return "device 'mps' asked for, but MPS is not available here; use cpu."
    return None


def adapter_class(prefix: str) -> type[Adapter]:
    """The adapter class registered for a spec prefix (loads that plugin, builds no model).

    Raises:
        UnknownNameError: no backend of that name (close names and the spec forms listed).
        PluginLoadError: the plugin is installed but does not import (a missing dependency is named).
    """
    problem = backend_problem(prefix)
    if problem is not None:
        raise problem
    return adapters.get(prefix)


def missing_dependency(cls: type[Adapter], exc: ModuleNotFoundError) -> MissingDependencyError:
    """One line naming what to install when ``cls`` needs a module that is not there."""
    module = exc.name or str(exc)
    return MissingDependencyError(
        f"The {cls.name or cls.__name__} backend needs the Python module {module!r}, which is not installed. "
        f"Install it: {install_command(module, library=cls.library, extra=cls.extra)}"
    )


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
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"A model is named by a string: an alias from `probekit models` or a spec such as "
                          f"timm:vit_small_patch16_224; got {name!r}. To probe your own nn.Module, "
                          "use pk.wrap(module).")
    problem = device_problem(device) if device is not None else None
    if problem:
        raise ConfigError(problem)
    spec, opts, meta = resolve(name, **options)
    prefix, _, rest = spec.partition(":")
    cls = adapter_class(prefix)
    opts = check_model_options(cls, opts, spec=spec)
    try:
        adapter = cls.from_spec(rest, **opts)
    except WeightsUnavailableError as exc:
        if "install" in meta:  # the alias knows the one command that brings its weights
            raise WeightsUnavailableError(f"{exc} For the alias {name!r}: `{meta['install']}`.") from exc
        raise
    except ModuleNotFoundError as exc:  # a library the backend imports when building
        raise missing_dependency(cls, exc) from exc
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
            with eval_mode(module):  # binding never changes the caller's train/eval mode
                adapter = cls.from_module(module, **options)
            spec = f"{name}:<{type(module).__name__}>"
            return ProbedModel(adapter, spec=spec, label=label or type(module).__name__)
    raise UnsupportedArchitectureError(
        f"No adapter understands a {type(module).__module__}.{type(module).__name__} (tried: "
        f"{', '.join(tried)}). Write one: subclass probekit.Adapter (from_module, can_wrap, layout, "
        "tap, num_layers, num_heads), register it under the 'probekit.adapters' entry point, and "
        "prove it with probekit.testing.check_adapter."
    )
