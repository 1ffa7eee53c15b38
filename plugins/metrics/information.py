"""Normalized mutual information between query and key positions (Park et al. 2023)."""

from __future__ import annotations

import math

import torch

from probekit.attention import LayerAttention, row_blocks
from probekit.metric import Metric
from probekit.metric.patch_keys import patch_rows, row_entropy
from probekit.tokens import TokenLayout


class NormalizedMutualInformation(Metric):
    """How much a head's attention depends on the query: NMI between query and key positions.

    Treat one head's attention as a joint distribution over (query patch, key patch) with a
    uniform ``p(q) = 1/N`` over the ``N`` query patches and rows ``A[q, k]`` renormalized over
    patch keys (prefix tokens dropped from both sides)::

        p(k) = sum_q p(q) A[q, k]
        I    = sum_{q,k} p(q) A[q, k] ln(A[q, k] / p(k))  =  H(k) - mean_q H(A[q, :])
        NMI  = I / sqrt(H(q) H(k)),    H(q) = ln N,  H(k) = -sum_k p(k) ln p(k)

    NMI is 1 when each query attends to its own key (identity) and 0 when every query
    attends the same way (every row equal), whatever that shared pattern is: Park et al.
    2023 ("What Do Self-Supervised Vision Transformers Learn?") find contrastive models'
    later layers near 0 (attention collapses to the same objects for all queries) and
    masked-modelling models high. Defined as 0 where ``H(k) = 0``.

    Not a mean of per-row values (``p(k)`` needs all rows), so it is not row-wise for the
    engine; it still reads probabilities by blocks of query rows and keeps only the running
    ``sum_q A[q, :]`` and ``sum_q H(A[q, :])``, never the whole ``[B, H, T, T]`` matrix.

    Returns:
        ``[B, H]`` per image and head, in ``[0, 1]``.

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(3, 3), patch_size=(16, 16))
    >>> ident = torch.eye(10).expand(1, 2, 10, 10)
    >>> NormalizedMutualInformation().compute(ident, lay).tolist()
    [[1.0, 1.0]]
    """

    name = "nmi"
    description = "normalized mutual information between query and key patches (1 query-specific, 0 same for all)"
    citation = "Park et al. 2023, What Do Self-Supervised Vision Transformers Learn?"
    reduces = "layer"
    #: memory budget for one block of query rows' probabilities
    block_bytes = 64 * 2**20

    def compute(self, probs: torch.Tensor, layout: TokenLayout, logits: torch.Tensor | None = None) -> torch.Tensor:
        """NMI of one layer from its probabilities (``logits``: unused)."""
        layout.check(probs.shape[-1], where="attention")
        return self.on_attention(-1, LayerAttention(probs_given=probs), layout)

    def on_attention(self, layer: int, attn: LayerAttention, layout: TokenLayout) -> torch.Tensor:
        b, h, t = attn.shape
        p = layout.num_prefix
        col_sum, ent_sum = None, None
        for blk in row_blocks(p, t, b, h, t, self.block_bytes):
            z, p_blk = attn.block(blk)
            a = patch_rows(p_blk, layout, z)  # from the logits where the tap has them (no underflow)
            cs, es = a.sum(2), row_entropy(a).sum(2)
            col_sum = cs if col_sum is None else col_sum + cs
            ent_sum = es if ent_sum is None else ent_sum + es
        assert col_sum is not None and ent_sum is not None  # a layout has a patch at least: one block of rows
        n = layout.num_patches
        pk = col_sum / n
        h_k = row_entropy(pk)
        mi = h_k - ent_sum / n
        denom = (math.log(n) * h_k).sqrt()
        tiny = torch.finfo(denom.dtype).tiny
        return torch.where(denom > 1e-12, mi / denom.clamp_min(tiny), torch.zeros_like(mi)).clamp(0, 1)
