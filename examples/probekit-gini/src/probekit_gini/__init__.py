"""Example probekit metric plugin (the worked metric of probekit's docs/plugins.md).

The metric lives in :mod:`probekit_gini.metric`; this package imports nothing, so that listing
plugins (``probekit metrics``) can read the metric's description without importing torch.
"""
