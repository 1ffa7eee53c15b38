"""transformers families whose layers are not all global: where their attention modules are,
each layer's geometry (:mod:`probekit.geometry`), and how to tap the ones that compute their
attention outside transformers' ``AttentionInterface``.

- Swin (``SwinModel``): the image is padded to whole patches, each stage's grid padded to whole
  windows and *then* rolled (timm rolls first), windows shrink to the grid and shifts vanish when
  the grid is no larger than a window; patch merging halves the grid (odd sizes padded up) at
  the end of each stage. The window and shift are read from each block as its forward will use
  them (transformers clamps and keeps them on the module).
- Hiera (``HieraModel``): mask units, query pooling and the unrolled token order, shared with
  timm's Hiera in ``_hiera_geometry.py``.
- SwinV2 (``Swinv2Model``): Swin's padding, roll and merging, but each block fixes its window and
  shift when built (from the native grid; a smaller input is padded up to the window, not
  clamped). Its cosine attention (logit scale, continuous position-bias MLP, shift mask) is
  computed in ``Swinv2SelfAttention`` itself: the tap reads the probabilities entering its
  ``dropout`` module.
- SAM vision encoder (``SamVisionEncoder``, also inside ``SamVisionModel`` / ``SamModel``): ViTDet
  windows padded at the bottom and right, a few global blocks (window size 0), decomposed
  relative-position bias. The SDPA variant calls ``F.scaled_dot_product_attention`` with the
  bias as its mask (the SDPA spy reads it, heads apart); the eager one returns its
  probabilities ``[B * heads, N, N]`` second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from probekit.geometry import LayerGeometry
from probekit.tokens import TokenLayout

from ._hiera_geometry import HF_HIERA, row_major
from ._sdpa_spy import watch_attention
from ._timm_geometry import block_tokens, regrouped, vitdet_geometry
from ._typing import LibraryModule

__all__ = ["STAGED", "Staged"]


@dataclass(frozen=True)
class Staged:
    """How the transformers adapter reads one family whose layers are not all global.

    Args:
        blocks: ``encoder -> blocks`` in layer order (each holds the family's attention module).
        geometry: ``(encoder, layout) -> {layer: TokenLayout | LayerGeometry}``.
        watch: ``(attention module, report, where) -> hook handles`` for an attention computed
            outside the ``AttentionInterface`` (``report`` as :func:`._sdpa_spy.attention_report`
            makes it); None: the interface's ``probekit_sdpa`` reports it.
        fixed_size: the encoder takes only its config's image size (SAM adds its position table
            without resampling); else it pads the input up to whole patches (Swin).
        eager: switches a copy of the encoder to eager attention modules returning their
            probabilities (the reference), where the config alone does not (SAM picks its class at build).
        hidden_tokens: ``(block output, block inputs) -> [B, T, C]`` tokens of a layer's block, in the
            row-major order of the layout its geometry gives (None: block outputs not tapped,
            hidden-state metrics refused).
        hidden_order: ``layer geometry -> order`` putting a block's tokens row-major (Hiera), or None.
    """

    blocks: Callable[[nn.Module], list[nn.Module]]
    geometry: Callable[[nn.Module, TokenLayout], dict]
    watch: Callable | None = None
    fixed_size: bool = False
    eager: Callable[[nn.Module], None] | None = None
    hidden_tokens: Callable[[object, tuple], torch.Tensor] | None = None
    hidden_order: Callable[[object], torch.Tensor | None] | None = None


def _swin_blocks(encoder: LibraryModule) -> list[nn.Module]:
    return [blk for stage in encoder.encoder.layers for blk in stage.blocks]


def _swin_geometry(encoder: LibraryModule, layout: TokenLayout, clamp: bool = True) -> dict:
    grid, stride = layout.grid, layout.patch_size
    out, i = {}, 0
    for stage in encoder.encoder.layers:
        for blk in stage.blocks:
            win, shift = int(blk.window_size), int(blk.shift_size)
            if clamp and min(grid) <= win:  # what SwinLayer.set_shift_and_window_size does before attending
                win, shift = min(grid), 0
            out[i] = LayerGeometry.windows(grid, stride, win, shift, image_size=layout.image_size,
                                           base_grid=layout.grid, pad_first=True)
            i += 1
        if stage.downsample is not None:
            grid, stride = ((grid[0] + 1) // 2, (grid[1] + 1) // 2), (stride[0] * 2, stride[1] * 2)
    return out


def _swinv2_geometry(encoder: LibraryModule, layout: TokenLayout) -> dict:
    return _swin_geometry(encoder, layout, clamp=False)  # windows and shifts fixed at build


def _swinv2_watch(attn: LibraryModule, report, where: str) -> list:
    return watch_attention(attn.self, report, where, drop="dropout")


def _sam_blocks(encoder: LibraryModule) -> list[nn.Module]:
    return list(encoder.layers)


def _sam_geometry(encoder: LibraryModule, layout: TokenLayout) -> dict:
    return vitdet_geometry(layout, [blk.window_size for blk in encoder.layers])


def _sam_watch(attn: LibraryModule, report, where: str) -> list:
    return watch_attention(attn, regrouped(report, int(attn.num_attention_heads)), where, weights_out=True)


def _sam_eager(encoder: LibraryModule) -> None:
    from transformers.models.sam.modeling_sam import SamVisionAttention

    for blk in encoder.layers:  # the SDPA class is a subclass with no state of its own
        blk.attn.__class__ = SamVisionAttention


#: family name -> how the adapter reads it
STAGED = {
    "swin": Staged(_swin_blocks, _swin_geometry, hidden_tokens=block_tokens),  # blocks output [B, H * W, C]
    "swinv2": Staged(_swin_blocks, _swinv2_geometry, watch=_swinv2_watch, hidden_tokens=block_tokens),
    "sam": Staged(_sam_blocks, _sam_geometry, watch=_sam_watch, fixed_size=True, eager=_sam_eager,
                  hidden_tokens=block_tokens),  # blocks output [B, H, W, C]
    "hiera": Staged(*HF_HIERA, hidden_tokens=block_tokens, hidden_order=row_major),  # attention tapped at its
    # Tensor.softmax (Family.softmax_tap); blocks output [B, N, C] in the unrolled order
}
