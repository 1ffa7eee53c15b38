"""The metric SPI: the :class:`Metric` base class, its declared options and state, and the
row helpers metrics share (patch keys, entropies of rows).

- :mod:`probekit.metric.base`: the contract (what a metric declares and computes);
- :mod:`probekit.metric.options`: declared, validated options and labels;
- :mod:`probekit.metric.state`: declared, mergeable state;
- :mod:`probekit.metric.patch_keys`: rows over patch keys, computed without underflow.
"""

from probekit.metric.base import RUN_SETTINGS, Metric

__all__ = ["Metric", "RUN_SETTINGS"]
