"""What a row-wise metric reads: one block of query rows of one layer, with what the engine's path has.

The engine computes a layer's attention along one of several paths (blocks of q·kᵀ and their
softmax, one attention pass that also makes the layer's output, the C row kernel's or the
Triton kernel's per-row sums, windows and pooled keys group by group, probabilities handed over
by the tap). Each path hands a metric's :meth:`~probekit.Metric.row_values` a :class:`Block`
carrying the pieces it has; the pieces it does not have are None:

==============  =============================================  =====================================
piece           what                                           None on
==============  =============================================  =====================================
``probs``       float32 probabilities ``[n, H, R, K]``          the per-row-sums paths (``terms``)
``logits``      their float32 softmax inputs, same shape        taps that hand over probabilities
``terms``       per-row sums ``[n, H, R]`` (:class:`~probekit.metric.terms.RowTerms`)  every path but the kernels'
``layout``      the layer's :class:`~probekit.tokens.TokenLayout`  windowed, pooled, class-attention layers
``geometry``    the layer's :class:`~probekit.geometry.LayerGeometry`  global layers
==============  =============================================  =====================================

``rows`` are the block's query rows: absolute token indices of ``layout`` on a global layer
(always within the metric's :attr:`~probekit.Metric.query_tokens`), every query of each group
(``slice(0, Tq)``) on a grouped layer, where ``groups`` (``[n]``) gives each group's index within
its image (into the geometry's tables) and ``query_weight`` (``[n, R]``) which rows count: the
engine multiplies the per-row values by it before summing. A metric answers with per-row values
``[n, H, R, ...]`` (``[n, R, ...]`` when not per head), or None where its fast form cannot answer
from what the block has (the engine then asks again with probabilities). Where per-row values
would be large (a map per query row of every window), a metric may return their sum over the
block's rows, weighted by ``query_weight``, as a row axis of length 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probekit.geometry import LayerGeometry
from probekit.metric.patch_keys import patch_rows, visible_rows
from probekit.metric.terms import RowTerms
from probekit.tokens import TokenLayout

__all__ = ["Block"]


@dataclass(frozen=True)
class Block:
    """One block of query rows of one layer, as the current engine path has it (see the module docstring)."""

    rows: slice
    layout: TokenLayout | None = None
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    terms: RowTerms | None = None
    geometry: LayerGeometry | None = None
    groups: torch.Tensor | None = None
    query_weight: torch.Tensor | None = None

    def patch_rows(self, renormalize: bool = False) -> torch.Tensor:
        """The probabilities over the patch keys only.

        Global layers: ``[n, H, R, N]`` (prefix keys dropped). Grouped layers: ``[n, H, R, K]``,
        zero on keys a query does not see or that are not patches. With ``renormalize``, each row
        rescaled to sum to 1 over those keys, from the logits where the block has them (exact
        however much mass sits on prefix tokens: :mod:`probekit.metric.patch_keys`).
        """
        probs = self.probs
        if probs is None:
            raise ValueError("this block carries per-row sums, not probabilities (block.terms): read those, "
                             "or return None to be asked again with probabilities")
        if self.geometry is None:
            assert self.layout is not None
            if renormalize:
                return patch_rows(probs, self.layout, self.logits)
            return probs[..., self.layout.num_prefix:]
        keys = self.geometry.visible_patch_keys(probs.device)[self.groups][:, None]
        return visible_rows(probs, keys, self.logits) if renormalize else probs * keys
