"""Attention maps over the patch grid: CLS attention per head, and attention rollout."""

from __future__ import annotations

from typing import Literal

import torch

from probekit.attention import LayerAttention, row_blocks
from probekit.errors import ConfigError
from probekit.metric import Block, Metric
from probekit.tokens import TokenLayout

#: which query rows a map shows: the CLS token's, or the mean over query patches (models without CLS)
Query = Literal["cls", "mean"]


def _grid(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``[..., N]`` over patches -> ``[..., h, w]``."""
    return x.reshape(*x.shape[:-1], *layout.grid)


class ClsMap(Metric):
    """Where each head's CLS token looks: its attention over the patch grid, per image.

    ``M[h, i, j] = A_h[cls, patch(i, j)]``, the raw softmax row (mass on prefix tokens is
    left out, not renormalized). With ``query="mean"`` the map is the attention a patch
    receives on average, ``mean_q A_h[q, patch(i, j)]`` over query patches, for models
    without a CLS token. The self-attention maps of DINO (Caron et al. 2021, Fig. 1) are these
    CLS rows of the last layer.

    Args:
        query: ``"cls"`` (default) or ``"mean"`` (mean over query patches).
        renormalize: rescale each row to sum to 1 over patch keys.

    Returns:
        ``[B, H, h, w]`` per image and head (a map: stored in ``Results.arrays``).

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(2, 2), patch_size=(16, 16))
    >>> ClsMap().compute(torch.full((1, 1, 5, 5), 0.2), lay).shape
    torch.Size([1, 1, 2, 2])
    """

    name = "cls_map"
    requires = ()  # windowed layers: the attention each patch receives, on the model's patch grid
    description = "CLS (or mean query) attention over the patch grid, per image and head"
    citation = "Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers"
    is_map = True
    unit = "attention"

    query: Query = "cls"
    renormalize: bool = False

    query_tokens = property(lambda self: "cls" if self.query == "cls" else "patches")

    def row_values(self, block: Block) -> torch.Tensor | None:
        """Each query row over the patch grid: ``[n, H, R, h, w]`` (the engine averages the rows).

        On windowed, pooled and class-attention layers, the attention each key patch receives,
        placed at its cell of the key grid, then drawn on the model's patch grid (``base_grid``; a
        coarser stage's cell value repeated over the patches it covers), so every layer's map has
        one shape.
        """
        a = block.patch_rows(self.renormalize)
        if block.geometry is None:
            assert block.layout is not None
            return _grid(a, block.layout)
        geo = block.geometry
        assert block.query_weight is not None
        # summed over the rows here (a row axis of 1): a map per row of every window would be large
        recv = torch.einsum("nhqk,nq->nhk", a, block.query_weight.to(a.dtype))
        cell = geo.key_cell.to(a.device)[block.groups]
        kh, kw = geo.key_grid
        out = recv.new_zeros(*recv.shape[:2], kh * kw + 1)  # the last slot collects prefix and padding
        out.scatter_add_(2, torch.where(cell < 0, kh * kw, cell)[:, None].expand_as(recv), recv)
        maps = out[..., :-1].reshape(*recv.shape[:2], kh, kw)
        base = geo.base_grid or geo.key_grid
        if tuple(base) != (kh, kw):
            maps = torch.nn.functional.interpolate(maps, size=tuple(base), mode="nearest")
        return maps[:, :, None]


class AttentionRollout(Metric):
    """Attention rollout (Abnar & Zuidema 2020): attention propagated through the layers.

    Per layer ``l``, heads are fused (mean by default), the residual connection is modelled
    by adding the identity, and rows are renormalized; the rollout is the product over the
    layers so far, in order::

        W_l = mean_h A_h,    Ã_l = rownorm(0.5 W_l + 0.5 I),    R_l = Ã_l R_{l-1},   R_0 = Ã_0

    The value of layer ``l`` is the CLS row of ``R_l`` over the patches (``query="mean"``:
    the mean over patch rows), i.e. how much each patch flows into the CLS token up to that
    layer. Needs every layer from the first: probing a subset of layers raises.

    Args:
        query: ``"cls"`` (default) or ``"mean"`` (mean over query patches, models without CLS).
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads.

    Returns:
        ``[B, h, w]`` per image and layer, not per head (a map: stored in ``Results.arrays``).
    """

    name = "rollout"
    description = "attention rollout: CLS (or mean) row of the product of head-fused attention up to each layer"
    citation = "Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers"
    reduces = "batch"
    per_head = False
    is_map = True
    unit = "attention"
    #: memory budget for one block of query rows' probabilities while fusing heads
    block_bytes = 64 * 2**20

    query: Query = "cls"
    head_fusion: Literal["mean", "max", "min"] = "mean"

    def __init__(self, **options):
        super().__init__(**options)
        # per-batch scratch (the product so far, the last layer seen, this batch's maps), emptied
        # at each batch's end; the dataset state is the declared per-image maps (``values``)
        self._running, self._last, self._maps = None, -1, {}

    query_tokens = property(lambda self: "cls" if self.query == "cls" else "patches")  # refused without CLS

    def _fuse(self, attn: LayerAttention) -> torch.Tensor:
        b, h, t = attn.shape
        w = torch.empty(b, t, t, device=attn.device)
        for blk in row_blocks(0, t, b, h, t, self.block_bytes):
            p = attn.probs(blk)
            w[:, blk] = p.mean(1) if self.head_fusion == "mean" else getattr(p, self.head_fusion)(1).values
        return w

    def on_attention(self, layer: int, attn: LayerAttention, layout: TokenLayout) -> None:
        if layer == 0:  # a batch starts afresh (a batch that failed midway leaves no scratch behind)
            self._running, self._last, self._maps = None, -1, {}
        if layer != self._last + 1:
            raise ConfigError(
                f"rollout needs every layer from the first, in order; got layer {layer} after "
                f"{self._last}. Probe all layers (no layers=...) when asking for rollout."
            )
        w = self._fuse(attn)
        a = 0.5 * w + 0.5 * torch.eye(w.shape[-1], device=w.device)
        a = a / a.sum(-1, keepdim=True)
        self._running = a if self._running is None else torch.bmm(a, self._running)
        self._last = layer
        p = layout.num_prefix
        if self.query == "cls":
            i = layout.cls_index(f"metric {self.name!r}")
            row = self._running[:, i, p:]
        else:
            row = self._running[:, p:, p:].mean(1)
        self._maps[layer] = _grid(row, layout)
        return None

    def on_batch_end(self) -> dict[int, torch.Tensor]:
        maps = self._maps
        self._running, self._last, self._maps = None, -1, {}  # per-batch scratch, not state
        return maps

    def compute(self, probs: torch.Tensor, layout: TokenLayout, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Rollout of a single layer (``R_0``); use :func:`rollout` for a stack of layers (``logits``: unused)."""
        return rollout([probs], layout, self.query, self.head_fusion)[0]


def rollout(layers: list[torch.Tensor], layout: TokenLayout, query: str = "cls",
            head_fusion: str = "mean") -> list[torch.Tensor]:
    """Rollout maps ``[B, h, w]`` after each of ``layers`` (``[B, H, T, T]`` each, in order).

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(1, 2), patch_size=(16, 16))
    >>> uniform = torch.full((1, 1, 3, 3), 1 / 3)  # A~ = 2/3 on the diagonal, 1/6 off it
    >>> [round(v, 3) for v in rollout([uniform, uniform], lay)[-1].flatten().tolist()]
    [0.25, 0.25]
    """
    m = AttentionRollout(query=query, head_fusion=head_fusion)
    if query == "cls":
        layout.cls_index("metric 'rollout'")
    for i, p in enumerate(layers):
        layout.check(p.shape[-1], where="attention")
        m.on_attention(i, LayerAttention(probs_given=p), layout)
    return [v for _, v in sorted(m.on_batch_end().items())]
