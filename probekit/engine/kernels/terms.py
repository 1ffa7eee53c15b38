"""The per-query-row sums every kernel fills (the Triton kernel, the C row kernel, PyTorch's blocks)
and metrics read through :meth:`probekit.metric.Metric.kernel_row_sum`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TERMS", "RowTerms"]

#: every term a kernel can make (each kernel serves a subset; metrics declare theirs in ``kernel_terms``)
TERMS = ("lse", "patch_mass", "patch_logit", "dist", "prefix", "hist")


@dataclass
class RowTerms:
    """Per-query-row sums of one layer (float32, ``[B, H, T]`` unless noted), normalized by ``Z``."""

    lse: torch.Tensor
    patch_mass: torch.Tensor
    patch_logit: torch.Tensor | None = None
    dist_px: torch.Tensor | None = None
    dist_grid: torch.Tensor | None = None
    prefix: torch.Tensor | None = None  # [B, H, T, num_prefix]
    hist: torch.Tensor | None = None  # [B, H, T, bins]
    hist_spec: tuple | None = None  # the ``hist`` argument it was made with
