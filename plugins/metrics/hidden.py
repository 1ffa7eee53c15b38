"""Metrics of each block's output tokens: high-norm outlier tokens (linear CKA between layers is in
:mod:`probekit.plugins.metrics.cka`, re-exported here under its earlier import path)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from probekit.metric import Metric
from probekit.plugins.metrics.cka import LinearCKA, cka_between, cka_from_sums, hsic_matrix
from probekit.tokens import TokenLayout

__all__ = ["TokenNorms", "LinearCKA", "cka_between", "cka_from_sums", "hsic_matrix"]


class TokenNorms(Metric):
    """High-norm outlier tokens among the patch outputs of each block (Darcet et al. 2024).

    For each image, ``n_i = ||x_i||_2`` of every patch token ``x_i`` a block outputs (prefix
    tokens excluded) and its median ``m = median_i n_i`` (the lower one for an even count, as
    ``torch.median``):

    - ``"outlier_share"``: ``mean_i [n_i > threshold * m]``, the share of outlier patches;
    - ``"max_ratio"``: ``max_i n_i / m``.

    Darcet et al. ("Vision Transformers Need Registers", ICLR 2024) find that large ViTs
    recycle a few low-information patches as global stores, whose norms are about 10x the
    others'; registers remove them. The default ``threshold`` of 2 flags any patch more than
    twice the median; raise it for only the extreme artifacts.

    Args:
        threshold: outlier factor over the median norm (``outlier_share`` only), > 1.
        statistic: ``"outlier_share"`` (default) or ``"max_ratio"``.

    Returns:
        ``[B]`` per image (not per head).

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(2, 2), patch_size=(16, 16))
    >>> x = torch.ones(1, 5, 8); x[0, 4] *= 10          # one of 4 patches is a 10x outlier
    >>> TokenNorms().on_hidden(0, x, lay).tolist(), TokenNorms(statistic="max_ratio").on_hidden(0, x, lay).tolist()
    ([0.25], [10.0])
    """

    name = "token_norms"
    description = "share of patch tokens whose output norm exceeds threshold x the median (high-norm outliers)"
    citation = "Darcet et al. 2024, Vision Transformers Need Registers"
    needs = "hidden"
    reduces = "layer"
    per_head = False
    requires = ()  # block outputs mean the same under windowed attention

    threshold: Annotated[float, Field(gt=1)] = 2.0
    statistic: Literal["outlier_share", "max_ratio"] = "outlier_share"

    unit = property(lambda self: "share of patches" if self.statistic == "outlier_share" else "ratio to median norm")

    def on_hidden(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The statistic per image of one block's output tokens ``[B, T, D]``: ``[B]``."""
        layout.check(hidden.shape[1], where="hidden states")
        n = hidden[:, layout.num_prefix :].float().norm(dim=-1)  # [B, N]
        med = n.median(dim=-1, keepdim=True).values.clamp_min(torch.finfo(n.dtype).tiny)
        if self.statistic == "max_ratio":
            return (n / med).amax(-1)
        return (n > self.threshold * med).float().mean(-1)
