"""The per-query-row sums every kernel fills (the Triton kernel, the C row kernel, PyTorch's blocks)
and metrics read as ``block.terms`` (:class:`probekit.metric.block.Block`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["TERMS", "RowTerms"]

#: every term a kernel can make (each kernel serves a subset; metrics declare theirs in ``kernel_terms``)
TERMS = ("lse", "patch_mass", "patch_logit", "dist", "prefix", "hist")


@dataclass
class RowTerms:
    """Per-query-row sums of one layer (float32, ``[B, H, T]`` unless noted), normalized by ``Z``.

    ``lse``: log of the row's partition function; ``patch_mass``: ``sum_patch p``; ``patch_logit``:
    ``<p, z>`` over the patch keys; ``dist_px`` / ``dist_grid``: ``sum_patch p d`` with ``d`` the
    query-key patch distance in pixels / grid steps; ``prefix``: the probability of each prefix key;
    ``hist``: the attention mass per distance bin of ``hist_spec`` (``((step_y, step_x), squared
    left edges)``).
    """

    lse: torch.Tensor
    patch_mass: torch.Tensor
    patch_logit: torch.Tensor | None = None
    dist_px: torch.Tensor | None = None
    dist_grid: torch.Tensor | None = None
    prefix: torch.Tensor | None = None  # [B, H, T, num_prefix]
    hist: torch.Tensor | None = None  # [B, H, T, bins]
    hist_spec: tuple | None = None  # the ``hist`` argument it was made with

    def rows(self, rows: slice) -> RowTerms:
        """The same terms for the query rows ``rows`` only (views, no copies)."""
        start, stop, step = rows.indices(self.lse.shape[2])
        n = max(stop - start, 0)

        def cut(value: Any) -> Any:  # narrow: the slice's view in half the time of indexing (per layer and metric)
            if not isinstance(value, torch.Tensor):
                return value
            return value.narrow(2, start, n) if step == 1 else value[:, :, rows]

        return RowTerms(**{name: cut(getattr(self, name)) for name in _FIELDS})


_FIELDS = tuple(f.name for f in fields(RowTerms))
