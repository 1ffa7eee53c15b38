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
from what the block has (the engine then asks again with probabilities). Where the rows' sum has
a faster form (MAD's: one matrix-vector product over the block) or per-row values would be large
(a map per query row of every window), a metric may return that sum over the block's rows,
weighted by ``query_weight`` where given, as a row axis of length 1 (:meth:`Block.sum_rows`
tells the two apart by that length).
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

    @property
    def num_rows(self) -> int:
        """How many query rows the block has."""
        if self.probs is not None:
            return self.probs.shape[2]
        return len(range(*self.rows.indices(self.rows.stop if self.rows.stop is not None else 0)))

    def sum_rows(self, values: torch.Tensor, per_head: bool = True) -> torch.Tensor:
        """A metric's answer for this block summed over its rows, each weighted by :attr:`query_weight`:
        ``[n, H, R, ...]`` (or ``[n, R, ...]`` when not ``per_head``) -> ``[n, H, ...]``. A row axis
        of length 1 on a block of several rows is the rows' weighted sum already."""
        axis = 2 if per_head else 1
        if self.query_weight is not None and not (values.shape[axis] == 1 and self.num_rows != 1):
            w = self.query_weight.to(values.dtype)
            w = w.view(w.shape[0], *([1] * (axis - 1)), w.shape[1], *([1] * (values.dim() - axis - 1)))
            values = values * w
        return values.sum(dim=axis)

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
