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
    return block.sum_rows(v, m.per_head)
