"""Which query and key tokens of every layer a perturbed pixel box may move, and which it must,
derived from each layer's geometry alone (:mod:`probekit.geometry`): the pixel cell of every
token (a shifted window's roll undone, padding excluded, a pooled key at the centre of its
stride cell) and which keys each query sees.

Why two sets, and which layer is exact. A layer's q and k are per-token functions of the
tokens entering it, so a query's row of logits (a key's column) moves only if that token
entering the layer changed. Before the first attention a token depends on its own patch only:
the first layer's moved tokens are exactly those whose cells the box touches (``must == may``).
Every attention then mixes each query with the keys it sees, so the set of changed tokens
grows layer by layer (receptive fields), and how much a far token changes depends on the
attention weights: there is no exact set past the first layer. What stays exact is a bound,
propagated through the geometry of every layer before:

- ``may``: tokens whose cell meets the pixels the box can have reached (the cells of every
  token that saw a changed key in an earlier layer), plus tokens whose row (column) moves
  because most of the keys (queries) they see changed. A token outside it that moves means the
  geometry places the layer's tokens elsewhere than the model does: a roll not undone, a
  transposed or shifted grid, misplaced pooled keys, a window mask the model does not use.
- ``must``: tokens whose cell holds the box's own pixels: the residual stream carries the
  change there at full strength through every layer, so they move at any depth. Left out: a
  query that sees fewer than eight keys (a small region of a shifted window or a padded window
  at the border: the median of a short row is its smallest deviations, and a row of two entries
  moves the same whether its query or one of its keys changed), and a key
  most of whose queries see mostly changed keys (the median of such a row is itself a changed
  key, so the column need not stand out).

Windows bound the reach (Swin, SAM, Hiera); after a global layer it is the whole image and only
``must`` still pins positions. The geometry records no convolution kernels, so wherever tokens
are pooled or merged (``pooled`` layers; a query stride other than the stride entering the
layer) the bound adds one input cell around each cell, and pooled keys have no ``must``
(MViTv2 pools keys with a 3x3 kernel at stride 4: some input cells reach no key). An
overlapping patch embedding (PiT: 16 px kernels at stride 8; MViTv2: 7 px at 4) is described
by ``embed`` = (kernel, stride, padding) px, read from the model's first convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import torch

from probekit.geometry import KINDS, PAD, PATCH, LayerGeometry
from probekit.tokens import TokenLayout

__all__ = ["Expected", "as_geometry", "counted", "expected_moves", "token_boxes"]

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 in input pixels (end exclusive)
Embed = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # kernel, stride, padding per axis


@dataclass(frozen=True)
class Expected:
    """One layer's expected moves: ``[G, Tq]`` / ``[G, Tk]`` bool tensors, ``must <= moved <= may``."""

    must_q: torch.Tensor
    may_q: torch.Tensor
    must_k: torch.Tensor
    may_k: torch.Tensor

    @property
    def exact(self) -> bool:
        return bool(torch.equal(self.must_q, self.may_q) and torch.equal(self.must_k, self.may_k))


@overload
def as_geometry(layer: TokenLayout | LayerGeometry) -> LayerGeometry: ...
@overload
def as_geometry(layer: object) -> LayerGeometry | None: ...
def as_geometry(layer: object) -> LayerGeometry | None:
    """A layer's :class:`LayerGeometry` (a global :class:`TokenLayout` converted); None for a layer
    without token attention (channel attention)."""
    if isinstance(layer, TokenLayout):
        return LayerGeometry.from_layout(layer)
    return layer if isinstance(layer, LayerGeometry) else None


def counted(g: LayerGeometry) -> torch.Tensor:
    """``[G, Tq, Tk]``: the entries whose medians say what moved: visible, padding left out (every
    padding key is the same vector, so padding would make the majority of a padded window's row)."""
    real = (g.query_kind != PAD)[:, :, None] & (g.key_kind != PAD)[:, None, :]
    return real if g.visible is None else real & g.visible


def _key_step(g: LayerGeometry) -> tuple[float, float]:
    """Pixels per key cell: the query stride scaled by how much coarser the key grid is."""
    return (g.stride[0] * g.grid[0] / g.key_grid[0], g.stride[1] * g.grid[1] / g.key_grid[1])


def token_boxes(pos: torch.Tensor, step, halo=(0, 0)) -> torch.Tensor:
    """Integer pixel boxes ``[..., 4]`` (y0, y1, x0, x1) of cells ``step`` px around centres ``pos``
    ``[..., 2]``, grown by ``halo`` px on every side."""
    half = torch.tensor([step[0] / 2 + halo[0], step[1] / 2 + halo[1]], dtype=torch.float64)
    lo, hi = (pos - half + 1e-6).floor(), (pos + half - 1e-6).ceil()
    return torch.stack([lo[..., 0], hi[..., 0], lo[..., 1], hi[..., 1]], -1).long()


def _hits(mask: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Whether each box ``[..., 4]`` holds a True pixel of ``mask`` ``[H, W]`` (summed-area table)."""
    h, w = mask.shape
    s = torch.zeros(h + 1, w + 1, dtype=torch.long)
    s[1:, 1:] = mask.long().cumsum(0).cumsum(1)
    y0, y1 = boxes[..., 0].clamp(0, h), boxes[..., 1].clamp(0, h)
    x0, x1 = boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, w)
    return (s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]) > 0


def _paint(mask: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``mask`` with every box ``[N, 4]`` set True (a 2-D difference array, one pass)."""
    h, w = mask.shape
    d = torch.zeros(h + 1, w + 1, dtype=torch.long)
    y0, y1 = boxes[:, 0].clamp(0, h), boxes[:, 1].clamp(0, h)
    x0, x1 = boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, w)
    one = torch.ones_like(y0)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        d.index_put_((ys, xs), sign * one, accumulate=True)
    return mask | (d.cumsum(0).cumsum(1)[:h, :w] > 0)


def _first_cells(layout: TokenLayout, box: Box, size: tuple[int, int], embed: Embed | None) -> torch.Tensor:
    """Pixels ``[H, W]`` of the input cells whose tokens read a pixel of ``box`` (the patch embedding's
    kernel where it overlaps, else the cell itself)."""
    (gh, gw), (ph, pw) = layout.grid, layout.patch_size
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    (kh, kw), (sh, sw), (pad_h, pad_w) = embed or ((ph, pw), (ph, pw), (0, 0))
    reads = torch.stack([r * sh - pad_h, r * sh - pad_h + kh, c * sw - pad_w, c * sw - pad_w + kw], -1)
    y0, y1, x0, x1 = box
    hit = (reads[..., 0] < y1) & (reads[..., 1] > y0) & (reads[..., 2] < x1) & (reads[..., 3] > x0)
    cells = torch.stack([r * ph, (r + 1) * ph, c * pw, (c + 1) * pw], -1)[hit]
    return _paint(torch.zeros(size, dtype=torch.bool), cells)


def _atleast_half(vis: torch.Tensor, moving: torch.Tensor, dim: int) -> torch.Tensor:
    """Tokens whose median along ``dim`` of the visible entries sits on a moving one."""
    n = vis.sum(dim)
    return (2 * (vis & moving).sum(dim) >= n) & (n > 0)


def expected_moves(layers: list, box: Box, size: tuple[int, int], layout: TokenLayout,
                   embed: Embed | None = None) -> dict[int, Expected]:
    """``{layer: Expected}`` for perturbing ``box`` of an input of ``size`` px, for every layer with
    token attention (see the module docstring for the reasoning).

    Args:
        layers: each layer's geometry in order (:class:`TokenLayout`, :class:`LayerGeometry`, or
            a layer without token attention, which reaches every token).
        layout: the input's token layout (the cells the patch embedding makes).
        embed: the patch embedding's (kernel, stride, padding) px where tokens overlap.
    """
    first = _first_cells(layout, box, size, embed)
    reached, prefix = first.clone(), torch.zeros(len(KINDS), dtype=torch.bool)  # prefix kinds reached
    in_stride, out = tuple(layout.patch_size), {}
    for i, layer in enumerate(layers):
        g = as_geometry(layer)
        if g is None:  # channel attention mixes every token with every other
            reached[:], prefix[:] = True, True
            continue
        kstep = _key_step(g)
        pooled = g.kind == "pooled"
        halo_q = in_stride if pooled or tuple(g.stride) != in_stride else (0, 0)
        halo_k = in_stride if pooled or kstep != in_stride else (0, 0)
        qpatch, kpatch = g.query_kind == PATCH, g.key_kind == PATCH
        qbox, kbox = token_boxes(g.query_pos, g.stride), token_boxes(g.key_pos, kstep)
        q_aff = qpatch & _hits(reached, token_boxes(g.query_pos, g.stride, halo_q)) | prefix[g.query_kind.long()]
        k_aff = kpatch & _hits(reached, token_boxes(g.key_pos, kstep, halo_k)) | prefix[g.key_kind.long()]
        vis = torch.ones(g.groups, g.num_queries, g.num_keys, dtype=torch.bool) if g.visible is None else g.visible
        real = counted(g)
        may_q = q_aff | _atleast_half(real, k_aff[:, None, :], -1)
        may_k = k_aff | _atleast_half(real, may_q[:, :, None], -2)
        rows_ok = real.sum(-1) >= 8  # the median of a short row is too near its smallest deviation
        clean = rows_ok & ~_atleast_half(real, k_aff[:, None, :], -1)  # its median is an unmoved key
        cols_ok = 2 * (real & clean[:, :, None]).sum(-2) > real.sum(-2)
        must_q = qpatch & _hits(first, qbox) & rows_ok
        must_k = kpatch & _hits(first, kbox) & cols_ok & (halo_k == (0, 0))
        out[i] = Expected(must_q, may_q, must_k, may_k)
        changed = q_aff | (vis & k_aff[:, None, :]).any(-1)  # what leaves the layer changed
        reached = _paint(reached, qbox[changed & qpatch])
        prefix[g.query_kind[changed & ~qpatch].long()] = True
        prefix[KINDS.index("pad")] = False  # padding is made afresh in every layer
        in_stride = tuple(g.stride)
    return out
