"""The metric SPI: the :class:`Metric` base class, the :class:`Block` its row maths read, its
declared options and state, and the row helpers metrics share (patch keys, entropies of rows).

- :mod:`probekit.metric.base`: the contract (what a metric declares and computes);
- :mod:`probekit.metric.block`: one block of query rows, as each engine path has it;
- :mod:`probekit.metric.terms`: the per-row sums the kernels make (``block.terms``);
- :mod:`probekit.metric.options`: declared, validated options and labels;
- :mod:`probekit.metric.state`: declared, mergeable state;
- :mod:`probekit.metric.patch_keys`: rows over patch keys, computed without underflow.
"""

from probekit.metric.base import RUN_SETTINGS, Metric
from probekit.metric.block import Block

__all__ = ["Block", "Metric", "RUN_SETTINGS"]
