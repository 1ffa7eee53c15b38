"""probekit: probe the attention of Vision Transformers, the same way across models and libraries.

>>> import probekit as pk
>>> "mad" in pk.metrics.names()
True
"""

from __future__ import annotations

from .adapter import Adapter, ProbedModel
from .attention import LayerAttention
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
from .images import resolve_images, sample_images
from .metric import Metric
from .models import aliases, load, wrap
from .compare import compare
from .probe import probe
from .registry import adapters, metrics, register
from .results import Results
from .tokens import TokenLayout
from . import sources  # pk.sources.ClassFolder, Manifest, WebDataset, HFDataset

try:
    from importlib.metadata import version as _version

    __version__ = _version("probekit")
except Exception:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Adapter", "ProbedModel", "LayerAttention", "Metric", "TokenLayout", "Results",
    "load", "wrap", "probe", "compare", "aliases", "adapters", "metrics", "register",
    "resolve_images", "sample_images", "sources",
    "ProbekitError", "ConfigError", "ImageError", "LayoutError", "PluginLoadError",
    "UnknownNameError", "UnsupportedArchitectureError", "WeightsUnavailableError",
]
