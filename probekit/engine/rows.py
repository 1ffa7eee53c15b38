"""How the engine folds a row-wise metric's answer for one block: its per-row values, summed over the rows."""

from __future__ import annotations

import torch

from probekit.metric import Block, Metric

__all__ = ["row_sum"]


def row_sum(m: Metric, block: Block) -> torch.Tensor | None:
    """``m``'s per-row values of ``block`` summed over the rows (weighted by ``block.query_weight``):
    ``[n, H, ...]``; None where ``m`` cannot answer from what the block has (it must, from probabilities)."""
    v = m.row_values(block)
    if v is None:
        if block.probs is not None:
            raise RuntimeError(f"{type(m).__name__}.row_values returned None for a block with probabilities: None "
                               "means 'ask again with probabilities', so it must answer here.")
        return None
    axis = 2 if m.per_head else 1
    rows = len(range(*block.rows.indices(block.rows.stop)))
    if block.query_weight is not None and not (v.shape[axis] == 1 and rows != 1):  # 1 row: summed already
        w = block.query_weight.to(v.dtype)
        w = w.view(w.shape[0], *([1] * (axis - 1)), w.shape[1], *([1] * (v.dim() - axis - 1)))
        v = v * w
    return v.sum(dim=axis)
