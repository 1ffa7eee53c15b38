"""Example probekit metric plugin (the worked metric of probekit's docs/plugins.md)."""

from .metric import AttentionGini, gini

__all__ = ["AttentionGini", "gini"]
