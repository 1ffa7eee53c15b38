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
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import (
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
    "probe": "probe", "compare": "compare", "adapters": "registry", "metrics": "registry", "register": "registry",
    "resolve_images": "images", "sample_images": "images",
}
_SUBMODULES = ("sources",)  # pk.sources.ClassFolder, Manifest, WebDataset, HFDataset

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports the lazy table stands for
    from .adapter import Adapter, ProbedModel
    from .attention import LayerAttention
    from .compare import compare
    from .images import resolve_images, sample_images
    from .metric import Metric
    from .models import aliases, load, wrap
    from .probe import probe
    from .registry import adapters, metrics, register
    from .results import Results
    from .tokens import TokenLayout


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it on the package
    if name == "__version__":
        try:
            from importlib.metadata import version

            value = version("probekit")
        except Exception:  # running from a source tree that is not installed
            value = "0+unknown"
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probekit' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``pk.probe`` and ``pk.compare`` the functions once their modules are imported.

    Why: importing ``probekit.probe`` sets the package attribute ``probe`` to the module, which
    would shadow the lazily bound function of the same name (the module stays in sys.modules).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES) | {"__version__"})


__all__ = [
    "Adapter", "ProbedModel", "LayerAttention", "Metric", "TokenLayout", "Results",
    "load", "wrap", "probe", "compare", "aliases", "adapters", "metrics", "register",
    "resolve_images", "sample_images", "sources",
    "ProbekitError", "ConfigError", "ImageError", "LayoutError", "PluginLoadError",
    "UnknownNameError", "UnsupportedArchitectureError", "WeightsUnavailableError",
]
