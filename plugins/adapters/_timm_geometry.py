"""timm families whose layers are not all one global attention: where their attention modules are,
and each layer's geometry (:mod:`probekit.geometry`).

- Swin / SwinV2: windows of ``window_size`` tokens, shifted by ``shift_size`` every other block; the
  grid halves (stride doubles) at each stage's patch merging (odd sizes padded up first).
- SAM / ViTDet image encoder (``samvit_*``): windows of 14 tokens padded at the bottom and right,
  with a few global blocks (``global_attn_indexes``); q/k arrive as ``[B * heads, N, d]``.
- CaiT: global self-attention over the patches (talking heads: the softmax of the head-mixed
  logits, before ``proj_w`` mixes the heads again), then class-attention layers whose only query
  is the class token.

Each family is three functions: attention modules in layer order (dotted names, for hooks and the
reference), the per-layer geometry for an input, and how to read one report into ``[B, H, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from probekit.geometry import LayerGeometry
from probekit.tokens import TokenLayout, pair

__all__ = ["GEOMETRIES", "StagedFamily"]


@dataclass(frozen=True)
class StagedFamily:
    """How the timm adapter reads one family whose layers are not all global.

    Args:
        attention: ``model -> [(dotted name, attention module)]`` in layer order.
        geometry: ``(model, layout) -> {layer: TokenLayout | LayerGeometry}``.
        heads_first: q/k/bias/probs arrive with batch and heads merged (``[B * H, ...]``, SAM).
        num_prefix: prefix tokens of the model's input layout (CaiT's class token joins late).
        softmax_of: name of a submodule whose output is the layer's pre-softmax logits laid out
            ``[B, T, T, H]`` (CaiT's talking heads: ``proj_l``), read instead of SDPA/``attn_drop``.
    """

    attention: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    geometry: Callable[[nn.Module, TokenLayout], dict]
    heads_first: bool = False
    num_prefix: int = 0
    softmax_of: dict | None = None


def _swin_attention(model):
    return [(f"layers.{s}.blocks.{b}.attn", blk.attn)
            for s, stage in enumerate(model.layers) for b, blk in enumerate(stage.blocks)]


def _swin_geometry(model, layout: TokenLayout) -> dict:
    grid, stride = layout.grid, layout.patch_size
    out, i = {}, 0
    for stage in model.layers:
        if not isinstance(getattr(stage, "downsample", nn.Identity()), nn.Identity):
            grid, stride = ((grid[0] + 1) // 2, (grid[1] + 1) // 2), (stride[0] * 2, stride[1] * 2)
        for blk in stage.blocks:
            out[i] = LayerGeometry.windows(grid, stride, pair(blk.window_size), pair(blk.shift_size),
                                           image_size=layout.image_size, base_grid=layout.grid)
            i += 1
    return out


def _sam_attention(model):
    return [(f"blocks.{i}.attn", blk.attn) for i, blk in enumerate(model.blocks)]


def _sam_geometry(model, layout: TokenLayout) -> dict:
    out = {}
    for i, blk in enumerate(model.blocks):
        if blk.window_size:
            out[i] = LayerGeometry.windows(layout.grid, layout.patch_size, blk.window_size,
                                           image_size=layout.image_size, base_grid=layout.grid)
        else:
            out[i] = layout
    return out


def _cait_attention(model):
    return ([(f"blocks.{i}.attn", b.attn) for i, b in enumerate(model.blocks)]
            + [(f"blocks_token_only.{i}.attn", b.attn) for i, b in enumerate(model.blocks_token_only)])


def _cait_geometry(model, layout: TokenLayout) -> dict:
    patches = TokenLayout(0, layout.grid, layout.patch_size)
    cls = LayerGeometry.class_attention(layout)
    n = len(model.blocks)
    return {i: (patches if i < n else cls) for i in range(n + len(model.blocks_token_only))}


#: timm family name -> how to read it
GEOMETRIES = {
    "swin": StagedFamily(_swin_attention, _swin_geometry),
    "sam": StagedFamily(_sam_attention, _sam_geometry, heads_first=True),
    "cait": StagedFamily(_cait_attention, _cait_geometry, num_prefix=1,
                         softmax_of={"TalkingHeadAttn": "proj_l"}),
}


def merged_heads(report, heads: int):
    """A report that unmerges SAM's ``[B * H, ...]`` q/k/bias/probs into ``[B, H, ...]`` first."""

    def split(t):
        return None if t is None or t.dim() != 3 else t.reshape(-1, heads, *t.shape[1:])

    def wrapped(q=None, k=None, v=None, scale=None, bias=None, probs=None):
        # v is not passed on: the model's own kernel makes the [B * H, N, d] output (no one-pass)
        if probs is not None:
            report(probs=split(probs))
            return None
        b = bias if bias is None or bias.dim() != 3 else split(bias)
        report(q=split(q), k=split(k), scale=scale, bias=b)
        return None

    return wrapped


def logits_hook(report):
    """A forward hook on CaiT's ``proj_l``: its output ``[B, T, T, H]`` are the softmax's inputs."""

    def hook(module, args, out):
        report(probs=torch.softmax(out.float().permute(0, 3, 1, 2), dim=-1))

    return hook
