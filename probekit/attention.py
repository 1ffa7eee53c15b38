"""One layer's attention as a tap sees it, and the probabilities recomputed from it.

A tap hands over what the model's own softmax sees (q and k after any q/k-norm and rotary
embedding, the scale, an additive bias such as a relative-position table or a mask) or,
where the library already produced them, the probabilities. Probabilities are always
computed in float32 (bf16 drifts by 1e-2 on sharp heads) and can be produced a block of
query rows at a time, so long sequences never hold a whole [B, H, T, T] tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LayerAttention", "row_blocks"]


@dataclass
class LayerAttention:
    """The inputs of one layer's attention softmax.

    Either ``q``/``k`` (``[B, H, T, d]``) with ``scale`` and an optional additive ``bias``
    broadcastable to ``[B, H, T, T]``, or ``probs`` (``[B, H, T, T]``).
    """

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    probs_given: torch.Tensor | None = None

    def __post_init__(self):
        if self.probs_given is None and (self.q is None or self.k is None):
            raise ValueError("LayerAttention needs q and k, or probs.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(batch, heads, tokens)``."""
        t = self.probs_given if self.probs_given is not None else self.q
        return t.shape[0], t.shape[1], t.shape[2]

    @property
    def device(self) -> torch.device:
        return (self.probs_given if self.probs_given is not None else self.q).device

    def probs(self, rows: slice | None = None) -> torch.Tensor:
        """Float32 probabilities of the query rows ``rows`` (all by default): ``[B, H, R, T]``."""
        rows = rows or slice(None)
        if self.probs_given is not None:
            return self.probs_given[:, :, rows].float()
        q = self.q[:, :, rows].float()
        logits = torch.matmul(q, self.k.float().transpose(-1, -2))
        logits.mul_(self.scale)
        if self.bias is not None:
            b = self.bias
            if b.dim() >= 2 and b.shape[-2] != 1:
                b = b[..., rows, :]
            logits.add_(b.float())
        return torch.softmax(logits, dim=-1)


def row_blocks(start: int, stop: int, batch: int, heads: int, tokens: int, budget_bytes: int):
    """Slices of query rows in ``[start, stop)`` whose float32 probabilities fit ``budget_bytes``."""
    per_row = max(1, batch * heads * tokens * 4 * 2)  # logits and softmax output alive together
    step = max(1, min(stop - start, budget_bytes // per_row))
    for r in range(start, stop, step):
        yield slice(r, min(r + step, stop))
