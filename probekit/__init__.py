"""probekit: probe the attention of Vision Transformers, the same way across models and libraries.

Names are imported on first use (PEP 562 module ``__getattr__``): ``import probekit`` and the
command line's listings answer without importing torch or a model library; ``pk.load``,
``pk.probe`` and the rest import what they need when first touched.

>>> import probekit as pk
>>> "mad" in pk.metrics.names()
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from probekit.errors import (
    ConfigError,
    ImageError,
    LayoutError,
    PluginLoadError,
    ProbekitError,
    UnknownNameError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "Adapter": "adapter", "ProbedModel": "adapter", "LayerAttention": "attention", "Metric": "metric",
    "TokenLayout": "tokens", "Results": "results", "load": "models", "wrap": "models", "aliases": "models",
    "probe": "engine.probe", "compare": "api", "adapters": "registry", "metrics": "registry",
    "register": "registry", "resolve_images": "inputs.images", "sample_images": "inputs.images",
}
_SUBMODULES = {"sources": "inputs.sources"}  # pk.sources.ClassFolder, Manifest, WebDataset, HFDataset

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports the lazy table stands for
    from probekit.adapter import Adapter, ProbedModel
    from probekit.api import compare
    from probekit.attention import LayerAttention
    from probekit.engine.probe import probe
    from probekit.inputs.images import resolve_images, sample_images
    from probekit.metric import Metric
    from probekit.models import aliases, load, wrap
    from probekit.registry import adapters, metrics, register
    from probekit.results import Results
    from probekit.tokens import TokenLayout


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
        globals()[name] = value
        return value
    if name == "__version__":
        try:
            from importlib.metadata import version

            value = version("probekit")
        except Exception:  # running from a source tree that is not installed
            value = "0+unknown"
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES) | {"__version__"})


__all__ = [
    "Adapter", "ProbedModel", "LayerAttention", "Metric", "TokenLayout", "Results",
    "load", "wrap", "probe", "compare", "aliases", "adapters", "metrics", "register",
    "resolve_images", "sample_images", "sources",
    "ProbekitError", "ConfigError", "ImageError", "LayoutError", "PluginLoadError",
    "UnknownNameError", "UnsupportedArchitectureError", "WeightsUnavailableError",
]
