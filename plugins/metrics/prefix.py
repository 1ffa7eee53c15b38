"""Prefix mass: how much attention patch queries pay to CLS, distillation and register tokens."""

from __future__ import annotations

from typing import Literal

import torch

from probekit.metric import Block, Metric
from probekit.tokens import TokenLayout

Kind = Literal["all", "cls", "dist", "reg"]


def prefix_mask(layout: TokenLayout, kind: str, device=None) -> torch.Tensor:
    """Float mask ``[num_prefix]`` of the prefix tokens of ``kind`` (``"all"``: every one)."""
    assert layout.prefix_kinds is not None  # TokenLayout.__post_init__ fills in the default kinds
    sel = [kind == "all" or k == kind for k in layout.prefix_kinds]
    return torch.tensor(sel, dtype=torch.float32, device=device)


class PrefixMass(Metric):
    """Attention mass each head puts on prefix tokens, averaged over query patches.

    For a query patch ``q`` and the set ``S`` of prefix tokens of the chosen kind::

        m_q = sum_{k in S} A[q, k]            (raw softmax rows, not renormalized)

    then the mean over query patches. A model without prefix tokens of that kind gets 0.
    Heads that park attention on CLS or register tokens are the "attention sinks" of Darcet
    et al. 2024 (registers) and Xiao et al. 2024.

    Relation to MAD: with ``m_q`` over all prefix tokens (``kind="all"``), each row's
    un-renormalized MAD is ``(1 - m_q)`` times its renormalized MAD, so
    ``MAD(renormalize=False) = mean_q (1 - m_q) * MAD_q(renormalize=True)``: prefix mass counts
    as distance 0 in the reference definition.

    Args:
        kind: which prefix tokens count, from ``layout.prefix_kinds``: ``"all"`` (default),
            ``"cls"``, ``"dist"`` (DeiT distillation token) or ``"reg"`` (registers). One kind
            per instance; ask for several instances to split the mass by kind.

    Returns:
        ``[B, H]`` per image and head, in ``[0, 1]``.

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(2, 2), patch_size=(16, 16))
    >>> uniform = torch.full((1, 1, 5, 5), 1 / 5)
    >>> round(PrefixMass().compute(uniform, lay).item(), 2)
    0.2
    """

    name = "prefix_mass"
    display_name = "prefix-token mass"
    requires = ()  # windowed layers have no prefix keys (mass 0); class attention does
    description = "attention mass patch queries put on prefix tokens (cls/dist/reg or all)"
    citation = "Darcet et al. 2024, Vision Transformers Need Registers"
    unit = "fraction of attention"

    kind: Kind = "all"
    kernel_terms = frozenset({"prefix"})

    def row_values(self, block: Block) -> torch.Tensor | None:
        """``m_q``: each query row's mass on the prefix keys of ``kind`` (from the kernels' per-row prefix
        probabilities where the block has them; on grouped layers over the geometry's prefix keys)."""
        if block.geometry is not None:
            probs = block.probs
            assert probs is not None
            keys = block.geometry.key_mask("prefix" if self.kind == "all" else self.kind)
            return torch.einsum("nhqk,nk->nhq", probs, keys.to(probs.device, probs.dtype)[block.groups])
        layout = block.layout
        assert layout is not None
        p = layout.num_prefix
        if block.terms is not None:
            t = block.terms
            if p == 0:
                return t.patch_mass.new_zeros(t.patch_mass.shape)
            return None if t.prefix is None else t.prefix @ prefix_mask(layout, self.kind, t.prefix.device)
        probs = block.probs
        assert probs is not None
        if p == 0:
            return probs.new_zeros(probs.shape[:-1])
        return probs[..., :p] @ prefix_mask(layout, self.kind, probs.device)
