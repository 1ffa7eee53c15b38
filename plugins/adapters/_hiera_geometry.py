"""Hiera (timm ``Hiera``, transformers ``HieraModel``): mask-unit attention, query pooling and the
unrolled token order, described in the original image's pixel frame (:mod:`probekit.geometry`).

Hiera never keeps its tokens in row-major order. Right after the patch embedding it *unrolls*
them: for the strides ``s1, ..., sk`` of its schedule (``q_stride`` once per stage but the last),
the sequence runs over the offset inside an ``s1`` cell, then inside an ``s2`` cell, ..., then the
coarse cell, the ``s1`` offset outermost. So

- a stage's query pooling is a max over the outermost ``prod(s1)`` slices of the sequence (the
  2x2 neighbours of the finest grid), which consumes ``s1``; a pooled query sits at the centre of
  the cell it pools (the mean of its members' centres);
- mask-unit attention cuts the sequence as ``[T, G]`` (token ``t * G + g`` is token ``t`` of unit
  ``g``): with the schedule unconsumed beyond the mask unit, unit ``g`` is the ``g``-th block of the
  image (8x8 tokens at stage 1), its tokens in the unrolled order;
- global layers see every token, still in the unrolled order, until the schedule is used up (the
  last stage is row-major again and stays the engine's fast :class:`TokenLayout` path).

Attention arrives ``[B, H, G, Tq, Tk]`` (timm's mask-unit SDPA and softmax, transformers'
softmax) and reaches the metrics as ``[B * G, H, Tq, Tk]``, the group index fastest, as
:class:`~probekit.geometry.LayerGeometry` wants: the taps swap it (:func:`units_first`) for the
Twins fold ``regrouped``; the references fold with :func:`fold_windows`, written separately, so
parity checks the fold too. Each block's query stride, unit size and kind
are read from its attention module, so the geometry is what the forward does in either library.
"""

from __future__ import annotations

import math

import torch

from probekit.errors import LayoutError
from probekit.geometry import PATCH, LayerGeometry, _centres
from probekit.tokens import TokenLayout

from ._typing import LibraryModule

__all__ = ["fold_windows", "units_first", "hiera_geometry", "unrolled_cells", "row_major", "TIMM_HIERA", "HF_HIERA"]


def unrolled_cells(grid, schedule) -> torch.Tensor:
    """The row-major cell (of ``grid``) of each token of Hiera's unrolled sequence, ``[h * w]``."""
    h, w = grid
    sy, sx = (math.prod(s[d] for s in schedule) for d in (0, 1))
    if h % sy or w % sx:
        raise LayoutError(
            f"Hiera unrolls its {h}x{w} token grid by strides {list(map(tuple, schedule))}, which needs a grid "
            f"divisible by {sy}x{sx}. Use an input size whose token grid is a multiple of that (e.g. "
            f"{sy * 4 * -(-h // sy)}x{sx * 4 * -(-w // sx)} px with 4 px patches)."
        )
    idx = torch.arange(h * w).view(1, h, w)
    for a, b in schedule:  # offsets inside the current cell move ahead of the coarser grid
        n, hh, ww = idx.shape
        idx = idx.view(n, hh // a, a, ww // b, b).permute(0, 2, 4, 1, 3).reshape(n * a * b, hh // a, ww // b)
    return idx.reshape(-1)


def _cells_of(pos: torch.Tensor, grid, stride) -> torch.Tensor:
    """Row-major cell of each centre ``pos [..., 2]`` on a grid of ``stride`` px cells."""
    row = (pos[..., 0] / stride[0]).floor().long()
    col = (pos[..., 1] / stride[1]).floor().long()
    return row * grid[1] + col


def hiera_geometry(layout: TokenLayout, schedule, blocks) -> dict:
    """``{layer: TokenLayout | LayerGeometry}`` of a Hiera whose input has ``layout``.

    Args:
        layout: the patch grid (stride ``patch_stride``), no prefix tokens.
        schedule: the unroll strides ``[(sy, sx), ...]`` (finest first).
        blocks: per attention module ``(query stride (flat), unit size after pooling (flat),
            mask-unit attention?)``, as its forward reads them.
    """
    grid, stride, img = layout.grid, layout.patch_size, layout.image_size
    cells = unrolled_cells(grid, schedule)
    pos = _centres(grid, stride)[cells]  # [N, 2], sequence order
    todo = [tuple(s) for s in schedule]
    out: dict[int, TokenLayout | LayerGeometry] = {}
    for i, (q_stride, unit, mask_unit) in enumerate(blocks):
        keys, key_grid, key_stride = pos, grid, stride
        if q_stride > 1:
            if not todo or math.prod(todo[0]) != q_stride:
                raise LayoutError(f"Hiera layer {i} pools queries by {q_stride}, but its unroll schedule has "
                                  f"{todo[:1] or 'nothing'} left; report the model configuration.")
            s = todo.pop(0)
            pos = pos.view(q_stride, -1, 2).mean(0)  # pooled query: centre of the cell it pools
            grid, stride = (grid[0] // s[0], grid[1] // s[1]), (stride[0] * s[0], stride[1] * s[1])
        groups = keys.shape[0] // (q_stride * unit) if mask_unit else 1
        if groups == 1 and q_stride == 1 and not todo:  # row-major again: the fast path
            out[i] = TokenLayout(0, grid, stride)
            continue
        kpos = keys.view(-1, groups, 2).transpose(0, 1)  # [G, Tk, 2]: token t * G + g
        qpos = pos.view(-1, groups, 2).transpose(0, 1)
        window = ((int(qpos[0, :, 0].unique().numel()), int(qpos[0, :, 1].unique().numel()))
                  if mask_unit else None)
        kind = "pooled" if q_stride > 1 else ("window" if mask_unit else "global")
        qkind = torch.full(qpos.shape[:2], PATCH, dtype=torch.int8)
        kkind = torch.full(kpos.shape[:2], PATCH, dtype=torch.int8)
        out[i] = LayerGeometry(kind, qpos.contiguous(), kpos.contiguous(), qkind, kkind, grid, stride, img,
                               key_grid, _cells_of(kpos, key_grid, key_stride), window=window,
                               base_grid=layout.grid)
    return out


def row_major(geometry) -> torch.Tensor | None:
    """Where each row-major cell of a Hiera layer's query grid sits in its block's output sequence
    (``tokens[:, order]`` is row-major): the blocks output their queries in the unrolled order, token
    ``t * G + g`` being query ``t`` of unit ``g``. None where the layer is row-major already."""
    if isinstance(geometry, TokenLayout):
        return None
    pos = geometry.query_pos.transpose(0, 1).reshape(-1, 2)  # the sequence order
    return _cells_of(pos, geometry.grid, geometry.stride).argsort()


# -- reading the attention --------------------------------------------------------------------------
def fold_windows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, H, G, ...]`` (Hiera's mask units) -> ``[B * G, H, ...]``; 4-D tensors pass unchanged."""
    if t is None or t.dim() != 5:
        return t
    b, h, g = t.shape[:3]
    return t.transpose(1, 2).reshape(b * g, h, *t.shape[3:])


def units_first(report):
    """A report that reads Hiera's ``[B, H, G, ...]`` as ``[B, G, H, ...]``, the layout
    ``_timm_geometry.regrouped`` folds into ``[B * G, H, ...]`` (wrap that one with this)."""

    def swap(t):
        return t.transpose(1, 2) if t is not None and t.dim() == 5 else t

    def wrapped(q=None, k=None, v=None, scale=None, bias=None, probs=None):
        return report(q=swap(q), k=swap(k), v=swap(v), scale=scale, bias=swap(bias), probs=swap(probs))

    return wrapped


# -- the two libraries ----------------------------------------------------------------------------
def _timm_attention(model: LibraryModule) -> list[tuple[str, LibraryModule]]:
    return [(f"blocks.{i}.attn", blk.attn) for i, blk in enumerate(model.blocks)]


def _timm_geometry(model: LibraryModule, layout: TokenLayout) -> dict:
    blocks = [(int(a.q_stride), int(a.window_size), bool(a.use_mask_unit_attn)) for _, a in _timm_attention(model)]
    return hiera_geometry(layout, model.unroll.schedule, blocks)


def _hf_blocks(encoder: LibraryModule) -> list[LibraryModule]:
    return [layer for stage in encoder.encoder.stages for layer in stage.layers]


def _hf_geometry(encoder: LibraryModule, layout: TokenLayout) -> dict:
    blocks = [(int(b.attn.query_stride), int(b.attn.window_size), bool(b.attn.use_mask_unit_attn))
              for b in _hf_blocks(encoder)]
    return hiera_geometry(layout, encoder.unroll_schedule, blocks)


#: timm: (attention modules in order, geometry); transformers: (blocks in order, geometry)
TIMM_HIERA = (_timm_attention, _timm_geometry)
HF_HIERA = (_hf_blocks, _hf_geometry)
