"""Head similarity: how alike the heads of one layer attend (Jensen-Shannon divergence)."""

from __future__ import annotations

import torch

from probekit.metric import Block, Metric
from probekit.metric.patch_keys import row_entropy


def pairwise_js(a: torch.Tensor, budget_bytes: int = 64 * 2**20) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between the heads of rows ``a`` ``[B, H, R, T]``.

    Returns ``[B, H, H, R]``, symmetric with a zero diagonal. Uses
    ``JS(P, Q) = H((P + Q) / 2) - (H(P) + H(Q)) / 2``; the head pairs are formed all at once,
    in slices of rows that keep the ``[B, pairs, rows, T]`` mixture within ``budget_bytes``.
    """
    b, h, r, t = a.shape
    i, j = torch.triu_indices(h, h, 1, device=a.device)
    ent = row_entropy(a)  # [B, H, R]
    step = max(1, budget_bytes // max(1, b * len(i) * t * a.element_size()))
    js = torch.cat(
        [row_entropy((a[:, i, s : s + step] + a[:, j, s : s + step]) / 2) for s in range(0, r, step)], dim=2
    ) if len(i) else a.new_zeros(b, 0, r)
    js = (js - (ent[:, i] + ent[:, j]) / 2).clamp_min(0)
    out = a.new_zeros(b, h, h, r)
    out[:, i, j] = js
    out[:, j, i] = js
    return out


class HeadSimilarity(Metric):
    """Mean Jensen-Shannon divergence between one head's attention and the other heads'.

    For heads ``h != g`` of a layer and a query patch ``q``::

        JS_q(h, g) = H((A_h[q] + A_g[q]) / 2) - (H(A_h[q]) + H(A_g[q])) / 2     (nats, <= ln 2)
        D_h = mean_q  mean_{g != h}  JS_q(h, g)

    0 when a head attends exactly like all the others (redundant heads), up to ``ln 2`` when
    its attention is disjoint from theirs. Head redundancy is why many heads can be pruned
    (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"); divergences between
    heads' attention distributions are the measure of Clark et al. 2019 ("What Does BERT
    Look At?"), who use the same JS between heads. A layer with one head gets NaN.

    Args:
        renormalize: compare rows over patch keys only, renormalized. Default: the whole
            softmax rows, prefix tokens included (heads that differ only in how much they
            park on CLS do differ).

    Returns:
        ``[B, H]`` per image and head (mean divergence to the other heads).

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=0, grid=(1, 2), patch_size=(16, 16))
    >>> a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # head 0: both queries look at patch 0
    >>> probs = torch.stack([a, a.flip(-1)])[None]   # head 1: at patch 1 -> disjoint
    >>> [round(v, 4) for v in HeadSimilarity().compute(probs, lay)[0].tolist()]
    [0.6931, 0.6931]
    """

    name = "head_similarity"
    description = "mean Jensen-Shannon divergence (nats) between a head's attention rows and the other heads'"
    citation = "Clark et al. 2019, What Does BERT Look At?; Michel et al. 2019"
    unit = "nats"

    renormalize: bool = False

    def row_values(self, block: Block) -> torch.Tensor | None:
        probs = block.probs
        assert probs is not None  # no kernel terms declared: blocks always carry probabilities
        a = block.patch_rows(renormalize=True) if self.renormalize else probs
        h = a.shape[1]
        if h < 2:
            return torch.full(a.shape[:-1], float("nan"), dtype=a.dtype, device=a.device)
        return pairwise_js(a).sum(2) / (h - 1)
