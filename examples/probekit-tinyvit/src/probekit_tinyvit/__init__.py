"""Example probekit adapter plugin: a small hand-written ViT and the adapter that taps it.

See docs/plugins.md in the probekit repository: this package is the guide's worked adapter.
"""

from .adapter import TinyVitAdapter
from .model import TinyViT

__all__ = ["TinyViT", "TinyVitAdapter"]
