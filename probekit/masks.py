"""Attention masks as one additive float bias, whatever the library's boolean convention.

Libraries disagree on what ``True`` means in a boolean mask: ``F.scaled_dot_product_attention``
and transformers keep the positions that are True ("may attend"), ``nn.MultiheadAttention``
drops them ("may not attend"). Taps hand the softmax an additive bias, so each caller names its
library's convention here instead of inverting a mask by hand.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

__all__ = ["additive_bias"]


@overload  # a mask in, a bias out
def additive_bias(mask: torch.Tensor, *, true_means: Literal["attend", "ignore"],
                  is_causal: bool = False, shape: tuple[int, int] | None = None,
                  device=None) -> torch.Tensor: ...
@overload  # no mask: a bias only when causal
def additive_bias(mask: None, *, true_means: Literal["attend", "ignore"],
                  is_causal: bool = False, shape: tuple[int, int] | None = None,
                  device=None) -> torch.Tensor | None: ...
def additive_bias(mask: torch.Tensor | None, *, true_means: Literal["attend", "ignore"],
                  is_causal: bool = False, shape: tuple[int, int] | None = None,
                  device=None) -> torch.Tensor | None:
    """``mask`` (and a causal mask) as an additive float32 bias, or None when there is neither.

    Args:
        mask: a boolean mask, or a float mask that is already additive (returned as float32).
        true_means: what True means in a boolean mask: ``"attend"`` (SDPA, transformers) or
            ``"ignore"`` (``nn.MultiheadAttention``'s ``attn_mask`` and ``key_padding_mask``).
        is_causal: add SDPA's causal mask (query ``i`` sees keys ``<= i``); needs ``shape``.
        shape: ``(queries, keys)`` for the causal mask.
        device: where the causal mask goes (default: the mask's device, else CPU).

    >>> additive_bias(torch.tensor([True, False]), true_means="attend")
    tensor([0., -inf])
    >>> additive_bias(torch.tensor([True, False]), true_means="ignore")
    tensor([-inf, 0.])
    """
    if true_means not in ("attend", "ignore"):
        raise ValueError(f"true_means must be 'attend' or 'ignore', not {true_means!r}")
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            drop = ~mask if true_means == "attend" else mask
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(drop, float("-inf"))
        else:
            bias = mask.float()
    if is_causal:
        if shape is None:
            raise ValueError("is_causal=True needs shape=(queries, keys)")
        dev = device if device is not None else (mask.device if mask is not None else None)
        causal = torch.full(tuple(shape), float("-inf"), device=dev).triu_(1)
        bias = causal if bias is None else bias + causal
    return bias
