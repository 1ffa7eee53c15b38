"""The Gini coefficient of attention: how unequally a head spreads each query's attention.

The worked metric of probekit's plugin guide (docs/plugins.md). What it shows: a row-wise
metric (``row_values`` gives one value per query row of a block and the engine averages over the
query patches, a block of rows at a time, whatever path computed the block), declared options, and
the display name, unit and reference value that tables and figures read.
"""

from __future__ import annotations

from typing import Literal

import torch

from probekit import Metric, TokenLayout
from probekit.metric import Block


def gini(weights: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of each row of non-negative ``weights`` ``[..., N]`` -> ``[...]``.

    ``G = sum_i (2 i - N - 1) w_(i) / (N sum_i w_i)`` with ``w_(1) <= ... <= w_(N)`` sorted: 0 when
    all N weights are equal, ``(N - 1) / N`` when one weight holds everything. Scale-free, so
    rows need not sum to 1; an all-zero row gets 0.

    >>> gini(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])).tolist()
    [0.0, 0.75]
    """
    n = weights.shape[-1]
    w = weights.sort(dim=-1).values
    rank = torch.arange(1, n + 1, dtype=w.dtype, device=w.device)
    total = w.sum(-1)
    g = (w * (2 * rank - n - 1)).sum(-1) / (n * total.clamp_min(torch.finfo(w.dtype).tiny))
    return torch.where(total > 0, g, torch.zeros_like(g))


class AttentionGini(Metric):
    """Gini coefficient of each head's attention over keys, averaged over query patches.

    For a query patch ``q`` with attention ``A[q, k]`` over the ``N`` patch keys (prefix keys
    left out; the Gini coefficient is scale-free, so leaving them out renormalizes the row)::

        G_q = sum_i (2 i - N - 1) A_(i) / (N sum_k A[q, k])      (A_(i): the row sorted ascending)

    then the mean over query patches. 0 for uniform attention, ``(N - 1) / N`` when each query
    attends to one key: a scale-free measure of how concentrated attention is, beside entropy.

    Args:
        keys: ``"patches"`` (default) or ``"all"`` (prefix keys count as keys too).

    Returns:
        ``[B, H]`` per image and head.

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(2, 2), patch_size=(16, 16))
    >>> AttentionGini().compute(torch.eye(5).expand(1, 1, 5, 5), lay).item()
    0.75
    """

    name = "gini"
    description = "Gini coefficient of attention over keys (0 uniform, (N-1)/N one key), mean over query patches"
    citation = "Gini 1912; as an attention-concentration measure beside entropy"
    unit = "Gini coefficient"
    display_name = "attention Gini"

    keys: Literal["patches", "all"] = "patches"

    def row_values(self, block: Block) -> torch.Tensor:
        """The block's query rows ``[B, H, R, T]`` (``block.probs``) -> ``[B, H, R]``."""
        return gini(block.probs if self.keys == "all" else block.patch_rows())

    def reference_value(self, layout: TokenLayout) -> float:
        """Uniform attention has Gini 0: the line figures draw for "spread evenly"."""
        return 0.0
