"""timm families whose layers are not all one global attention: where their attention modules are,
and each layer's geometry (:mod:`probekit.geometry`).

- Swin / SwinV2: windows of ``window_size`` tokens, shifted by ``shift_size`` every other block; the
  grid halves (stride doubles) at each stage's patch merging (odd sizes padded up first).
- SAM / ViTDet image encoder (``samvit_*``): windows of 14 tokens padded at the bottom and right,
  with a few global blocks (``global_attn_indexes``); q/k arrive as ``[B * heads, N, d]``.
- CaiT: global self-attention over the patches (talking heads: the softmax of the head-mixed
  logits, before ``proj_w`` mixes the heads again), then class-attention layers whose only query
  is the class token.
- XCiT: cross-covariance attention over channels (refused: no token has a place in it; not
  tapped), then class-attention layers as CaiT's.
- MViTv2: queries pooled at stage starts, keys and values pooled onto a coarser grid (stride 4 in
  the first stage); its attention calls neither SDPA nor an ``attn_drop`` module, so a spy on
  ``Tensor.softmax`` (armed only while a watched module runs, like the SDPA spy) reads the logits
  after the relative-position terms.
- Twins (``twins_svt_*``, ``twins_pcpvt_*``): four stages, each with its own patch embedding (4 px,
  then 2x2 merges); locally-grouped attention in windows padded at the bottom and right (SVT,
  q/k as ``[B, windows, H, N, d]``), global attention to keys sub-sampled by a stride-``sr`` conv.
- Hiera: mask-unit attention with query pooling over its unrolled token order
  (``_hiera_geometry.py``); SDPA when fused, ``Tensor.softmax`` when not, both read as
  ``[B, H, mask units, Tq, Tk]``.

Each family is three functions: attention modules in layer order (dotted names, for hooks and the
reference), the per-layer geometry for an input, and how to read one report into ``[B, H, ...]``.

Hidden states: each layer's block (the module holding its ``attn``) outputs tokens of its stage,
read as ``[B, T, C]`` (:func:`block_tokens`) with the layout :func:`hidden_layout` derives from the
layer's geometry (query grid and stride, the prefix its queries carry), so token norms and CKA read
staged models too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from probekit.errors import UnsupportedArchitectureError
from probekit.geometry import KINDS, PAD, ChannelAttention, LayerGeometry
from probekit.tokens import TokenLayout, pair

from ._hiera_geometry import TIMM_HIERA, row_major
from ._typing import LibraryModule

__all__ = ["GEOMETRIES", "StagedFamily", "vitdet_geometry", "regrouped", "regroup_heads"]


@dataclass(frozen=True)
class StagedFamily:
    """How the timm adapter reads one family whose layers are not all global.

    Args:
        attention: ``model -> [(dotted name, attention module)]`` in layer order.
        geometry: ``(model, layout) -> {layer: TokenLayout | LayerGeometry}``.
        regroup: q/k/bias/probs may arrive as ``[B * H, N, ...]`` (SAM) or ``[B, G, H, N, ...]``
            (Twins' windows) rather than ``[B, H, N, ...]``: reshaped to ``[B * G, H, N, ...]``.
        prefix: the prefix kinds of the model's input layout (default: a class token if the model has
            a ``cls_token``; CaiT's joins late, only its class-attention layers see it).
        softmax_of: name of a submodule whose output is the layer's pre-softmax logits laid out
            ``[B, T, T, H]`` (CaiT's talking heads: ``proj_l``), read instead of SDPA/``attn_drop``.
        softmax_spy: read the first ``Tensor.softmax`` input of each watched module (MViTv2).
        skip: attention classes not tapped at all (XCiT's channel attention, refused by metrics).
        mask_units: attention arrives ``[B, H, G, Tq, Tk]`` from SDPA (fused) or ``Tensor.softmax``
            (unfused) and no module holds the probabilities (Hiera).
        patch, image_size, grid: the patch stride, native input size and the patch grid of an input
            size of a built model.
        hidden_tokens: ``(block output, block inputs) -> [B, T, C]`` tokens of a layer's block
            (None: block outputs not tapped, hidden-state metrics refused).
        hidden_order: ``layer geometry -> order`` putting a block's tokens row-major (Hiera), or None.
    """

    attention: Callable[[LibraryModule], list[tuple[str, LibraryModule]]]
    geometry: Callable[[LibraryModule, TokenLayout], dict]
    regroup: bool = False
    prefix: Callable[[LibraryModule], tuple[str, ...]] = (
        lambda m: ("cls",) * (getattr(m, "cls_token", None) is not None))
    softmax_of: dict | None = None
    softmax_spy: bool = False
    skip: tuple[str, ...] = ()
    mask_units: bool = False
    patch: Callable[[LibraryModule], tuple[int, int]] = lambda m: pair(m.patch_embed.patch_size)
    grid: Callable[[LibraryModule, tuple], tuple[int, int]] = lambda m, size: tuple(
        s // p for s, p in zip(size, pair(m.patch_embed.patch_size), strict=True))
    image_size: Callable[[LibraryModule], tuple[int, int]] = lambda m: pair(m.patch_embed.img_size)
    hidden_tokens: Callable[[object, tuple], torch.Tensor] | None = None
    hidden_order: Callable[[object], torch.Tensor | None] | None = None


def block_tokens(out, args) -> torch.Tensor:
    """A block's output as ``[B, T, C]``: MViTv2's ``(tokens, grid)`` unpacked, Swin's and SAM's
    channels-last ``[B, H, W, C]`` grids flattened row-major (the order of :class:`TokenLayout`)."""
    x = out[0] if isinstance(out, tuple) else out
    return x.flatten(1, 2) if x.dim() == 4 else x


def _cait_tokens(out, args) -> torch.Tensor:
    """CaiT's class-attention blocks return the class token alone; the patches they read (``args[0]``)
    go on unchanged to the final norm beside it, so a block's tokens are both."""
    return torch.cat([out, args[0]], dim=1) if len(args) == 2 else out


def hidden_layout(geometry, layout: TokenLayout) -> TokenLayout:
    """The layout of what a layer's block outputs, from the layer's attention ``geometry``.

    Windowed and pooled layers: their query grid and stride, with the prefix tokens their queries
    carry (MViTv2's class token); class attention (CaiT, XCiT): the input layout (the class token and
    the patches); XCiT's channel attention: the input's patches, without its class token (it joins
    later)."""
    if isinstance(geometry, TokenLayout):
        return geometry
    if isinstance(geometry, ChannelAttention):
        return TokenLayout(0, layout.grid, layout.patch_size)
    if geometry.kind == "class":
        return layout
    prefix = tuple(KINDS[c] for c in geometry.query_kind[0].tolist() if c > PAD)
    return TokenLayout(len(prefix), geometry.grid, geometry.stride, prefix)


def _swin_attention(model):
    return [(f"layers.{s}.blocks.{b}.attn", blk.attn)
            for s, stage in enumerate(model.layers) for b, blk in enumerate(stage.blocks)]


def _per_block(stages, layout: TokenLayout, shrink, make) -> dict:
    """``{layer: make(block, grid, stride)}`` over the blocks of ``stages``; ``shrink(stage, grid,
    stride)`` gives the grid and stride (px) a stage starts with (patch merging, pooling)."""
    grid, stride = layout.grid, layout.patch_size
    out: dict[int, TokenLayout | LayerGeometry] = {}
    for stage in stages:
        grid, stride = shrink(stage, grid, stride)
        for blk in stage.blocks:
            out[len(out)] = make(blk, grid, stride)
    return out


def _halve(stage, grid, stride):
    if isinstance(getattr(stage, "downsample", nn.Identity()), nn.Identity):
        return grid, stride
    return ((grid[0] + 1) // 2, (grid[1] + 1) // 2), (stride[0] * 2, stride[1] * 2)


def _swin_geometry(model, layout: TokenLayout) -> dict:
    return _per_block(model.layers, layout, _halve, lambda blk, grid, stride: LayerGeometry.windows(
        grid, stride, pair(blk.window_size), pair(blk.shift_size), image_size=layout.image_size,
        base_grid=layout.grid))


def _sam_attention(model):
    return [(f"blocks.{i}.attn", blk.attn) for i, blk in enumerate(model.blocks)]


def vitdet_geometry(layout: TokenLayout, window_sizes) -> dict:
    """The SAM/ViTDet encoder's layers (timm and transformers): windows of ``window_sizes[i]`` tokens
    padded at the bottom and right, or global over ``layout`` where the size is 0."""
    return {i: LayerGeometry.windows(layout.grid, layout.patch_size, win, image_size=layout.image_size,
                                     base_grid=layout.grid) if win else layout
            for i, win in enumerate(window_sizes)}


def _sam_geometry(model, layout: TokenLayout) -> dict:
    return vitdet_geometry(layout, [blk.window_size for blk in model.blocks])


def _cait_attention(model):
    return ([(f"blocks.{i}.attn", b.attn) for i, b in enumerate(model.blocks)]
            + [(f"blocks_token_only.{i}.attn", b.attn) for i, b in enumerate(model.blocks_token_only)])


def _cait_geometry(model, layout: TokenLayout) -> dict:
    patches = TokenLayout(0, layout.grid, layout.patch_size)
    cls = LayerGeometry.class_attention(layout)
    n = len(model.blocks)
    return {i: (patches if i < n else cls) for i in range(n + len(model.blocks_token_only))}


def _conv_out(n: tuple, mod) -> tuple[int, int]:
    k, st, p = (pair(getattr(mod, a)) for a in ("kernel_size", "stride", "padding"))
    return tuple((n[d] + 2 * p[d] - k[d]) // st[d] + 1 for d in (0, 1))


def _mvit_attention(model):
    return [(f"stages.{s}.blocks.{b}.attn", blk.attn)
            for s, stage in enumerate(model.stages) for b, blk in enumerate(stage.blocks)]


def _mvit_geometry(model, layout: TokenLayout) -> dict:
    grid, stride = layout.grid, layout.patch_size
    prefix = layout.prefix_kinds
    out = {}
    for i, (_, attn) in enumerate(_mvit_attention(model)):
        kgrid = _conv_out(grid, attn.pool_k) if attn.pool_k is not None else grid
        kcell = tuple(stride[d] * pair(attn.pool_k.stride)[d] for d in (0, 1)) if attn.pool_k is not None else stride
        if attn.pool_q is not None:
            q_stride = pair(attn.pool_q.stride)
            stride = (stride[0] * q_stride[0], stride[1] * q_stride[1])
            grid = _conv_out(grid, attn.pool_q)
        out[i] = LayerGeometry.pooled(grid, stride, kgrid, kcell, prefix, image_size=layout.image_size,
                                      base_grid=layout.grid)
    return out


def _pit_attention(model):
    return [(f"transformers.{s}.blocks.{b}.attn", blk.attn)
            for s, stage in enumerate(model.transformers) for b, blk in enumerate(stage.blocks)]


def _strided(conv, grid, stride):
    """The grid and its stride (px) after a strided ``conv`` (None: unchanged)."""
    if conv is None:
        return grid, stride
    s = pair(conv.stride)
    return _conv_out(grid, conv), (stride[0] * s[0], stride[1] * s[1])


def _pooled(stage, grid, stride):
    return _strided(None if stage.pool is None else stage.pool.conv, grid, stride)


def _pit_geometry(model, layout: TokenLayout) -> dict:
    return _per_block(model.transformers, layout, _pooled,
                      lambda blk, grid, stride: TokenLayout(layout.num_prefix, grid, stride, layout.prefix_kinds))


def _xcit_attention(model):
    return ([(f"blocks.{i}.attn", b.attn) for i, b in enumerate(model.blocks)]
            + [(f"cls_attn_blocks.{i}.attn", b.attn) for i, b in enumerate(model.cls_attn_blocks)])


def _xcit_geometry(model, layout: TokenLayout) -> dict:
    n = len(model.blocks)
    cls = LayerGeometry.class_attention(layout)
    return {i: (ChannelAttention() if i < n else cls) for i in range(n + len(model.cls_attn_blocks))}


def _twins_attention(model):
    return [(f"blocks.{s}.{b}.attn", blk.attn) for s, stage in enumerate(model.blocks) for b, blk in enumerate(stage)]


def _twins_geometry(model, layout: TokenLayout) -> dict:
    """Each stage starts with its own patch embedding (the first made ``layout``; then 2x2 merges).
    ``LocallyGroupedAttn``: windows of ``ws`` padded at the bottom and right, no shift;
    ``GlobalSubSampleAttn``: keys from an ``sr x sr`` stride-``sr`` conv, each at its cell's centre
    (``sr`` 1, or a plain ``Attention``: global over the stage's grid)."""
    stages = [SimpleNamespace(blocks=blocks, embed=embed.proj if s else None)
              for s, (blocks, embed) in enumerate(zip(model.blocks, model.patch_embeds, strict=True))]
    where = dict(image_size=layout.image_size, base_grid=layout.grid)

    def make(blk, grid, stride):
        attn = blk.attn
        if type(attn).__name__ == "LocallyGroupedAttn":
            return LayerGeometry.windows(grid, stride, attn.ws, **where)
        if getattr(attn, "sr", None) is not None:
            return LayerGeometry.pooled(grid, stride, *_strided(attn.sr, grid, stride), **where)
        return TokenLayout(0, grid, stride)

    return _per_block(stages, layout, lambda stage, grid, stride: _strided(stage.embed, grid, stride), make)


#: timm family name -> how to read it
GEOMETRIES = {
    "swin": StagedFamily(_swin_attention, _swin_geometry, hidden_tokens=block_tokens),
    "sam": StagedFamily(_sam_attention, _sam_geometry, regroup=True, hidden_tokens=block_tokens),
    "mvitv2": StagedFamily(_mvit_attention, _mvit_geometry, softmax_spy=True, hidden_tokens=block_tokens,
                           patch=lambda m: pair(m.patch_embed.proj.stride),
                           grid=lambda m, size: _conv_out(size, m.patch_embed.proj),
                           image_size=lambda m: tuple(f * s for f, s in zip(m.stages[0].feat_size,
                                                                            pair(m.patch_embed.proj.stride),
                                                                            strict=True))),
    "pit": StagedFamily(_pit_attention, _pit_geometry, prefix=lambda m: ("cls", "dist")[: m.num_tokens],
                        hidden_tokens=block_tokens,
                        patch=lambda m: pair(m.patch_embed.conv.stride),
                        grid=lambda m, size: _conv_out(size, m.patch_embed.conv)),
    "xcit": StagedFamily(_xcit_attention, _xcit_geometry, prefix=lambda m: ("cls",), skip=("XCA",),
                         hidden_tokens=block_tokens),
    "twins": StagedFamily(_twins_attention, _twins_geometry, regroup=True, hidden_tokens=block_tokens,
                          patch=lambda m: pair(m.patch_embeds[0].patch_size),
                          grid=lambda m, size: _conv_out(size, m.patch_embeds[0].proj),
                          image_size=lambda m: pair(m.patch_embeds[0].img_size)),
    "cait": StagedFamily(_cait_attention, _cait_geometry, prefix=lambda m: ("cls",),
                         softmax_of={"TalkingHeadAttn": "proj_l"}, hidden_tokens=_cait_tokens),
    "hiera": StagedFamily(*TIMM_HIERA, prefix=lambda m: (), mask_units=True, regroup=True,
                          hidden_tokens=block_tokens, hidden_order=row_major,
                          patch=lambda m: pair(m.patch_stride),
                          grid=lambda m, size: tuple(s // p for s, p in zip(size, pair(m.patch_stride), strict=True)),
                          image_size=lambda m: tuple(t * p for t, p in zip(m.tokens_spatial_shape,
                                                                           pair(m.patch_stride), strict=True))),
}


def regroup_heads(t: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """SAM's ``[B * H, N, ...]`` and Twins' windowed ``[B, G, H, N, ...]`` as ``[B * G, H, N, ...]``;
    None and 4-D ``[B, H, ...]`` pass unchanged."""
    return t if t is None or t.dim() not in (3, 5) else t.reshape(-1, heads, *t.shape[-2:])


def regrouped(report, heads: int):
    """A report that reshapes SAM's ``[B * H, N, ...]`` and Twins' windowed ``[B, G, H, N, ...]``
    q/k/bias/probs into ``[B * G, H, N, ...]`` first (``b * G + g``, :mod:`probekit.geometry`'s order)."""

    def regroup(t):
        return regroup_heads(t, heads)

    def wrapped(q=None, k=None, v=None, scale=None, bias=None, probs=None):
        if probs is not None:
            report(probs=regroup(probs))
            return None
        if q.dim() == 4:  # already [B, H, N, d] (Twins' sub-sampled, transformers' SDPA SAM): one pass may run
            return report(q=q, k=k, v=v, scale=scale, bias=bias)
        # v is not passed on: the model's own kernel makes its own-shaped output (no one pass)
        report(q=regroup(q), k=regroup(k), scale=scale, bias=regroup(bias))
        return None

    return wrapped


def logits_hook(report):
    """A forward hook on CaiT's ``proj_l``: its output ``[B, T, T, H]`` are the softmax's inputs."""

    def hook(module, args, out):
        report(probs=torch.softmax(out.float().permute(0, 3, 1, 2), dim=-1))

    return hook


class _SoftmaxPending(threading.local):
    report = None


_SOFTMAX = _SoftmaxPending()
_ORIGINAL_SOFTMAX = torch.Tensor.softmax
_SOFTMAX_LOCK = threading.Lock()
_SOFTMAX_USERS = 0


def _softmax_spy(self, *args, **kwargs):
    report = _SOFTMAX.report
    if report is not None and self.dim() in (4, 5):  # 5: Hiera's [B, H, mask units, Tq, Tk]
        _SOFTMAX.report = None  # one report per watched call
        report(probs=_ORIGINAL_SOFTMAX(self.float(), -1))
    return _ORIGINAL_SOFTMAX(self, *args, **kwargs)


@contextmanager
def watch_softmax():
    """``Tensor.softmax`` spied on for the duration (reference counted; inert outside watched modules)."""
    global _SOFTMAX_USERS
    with _SOFTMAX_LOCK:
        if _SOFTMAX_USERS == 0:
            torch.Tensor.softmax = _softmax_spy
        _SOFTMAX_USERS += 1
    try:
        yield
    finally:
        _SOFTMAX.report = None
        with _SOFTMAX_LOCK:
            _SOFTMAX_USERS -= 1
            if _SOFTMAX_USERS == 0:
                torch.Tensor.softmax = _ORIGINAL_SOFTMAX


def watch_module_softmax(attn: nn.Module, report, where: str) -> list:
    """Hooks arming the softmax spy while ``attn`` runs, failing loudly if it never fired."""

    def arm(module, args):
        _SOFTMAX.report = report

    def check(module, args, out):
        if _SOFTMAX.report is report:
            _SOFTMAX.report = None
            raise UnsupportedArchitectureError(
                f"{where} ({type(attn).__name__}) never called Tensor.softmax on its attention logits, so "
                "probekit cannot tap it. Report the model name."
            )

    return [attn.register_forward_pre_hook(arm), attn.register_forward_hook(check)]


def watch_sdpa_or_softmax(attn: nn.Module, report, where: str) -> list:
    """Hooks arming both spies while ``attn`` runs (Hiera: SDPA when fused, ``Tensor.softmax`` when
    not); the first to fire disarms the other (the sink's own softmax must not report again)."""
    from ._sdpa_spy import _PENDING

    def once(**kw):
        _PENDING.report = _SOFTMAX.report = None
        return report(**kw)

    def arm(module, args):
        _PENDING.report = _SOFTMAX.report = once

    def check(module, args, out):
        if _PENDING.report is once:
            _PENDING.report = _SOFTMAX.report = None
            raise UnsupportedArchitectureError(
                f"{where} ({type(attn).__name__}) called neither F.scaled_dot_product_attention nor "
                "Tensor.softmax on its attention logits, so probekit cannot tap it. Report the model name."
            )

    return [attn.register_forward_pre_hook(arm), attn.register_forward_hook(check)]


def softmax_reference(model: nn.Module, attentions: list[nn.Module], run, fold=lambda t: t) -> dict:
    """``{layer: probabilities}`` each module of ``attentions`` computes with ``Tensor.softmax`` while
    ``run()`` runs ``model`` (timm's unfused Hiera: no module holds them, and fx cannot trace it)."""
    found: dict = {}
    handles = []
    with watch_softmax():
        try:
            for i, attn in enumerate(attentions):
                def keep(probs, i=i):
                    found[i] = fold(probs)
                handles += watch_module_softmax(attn, keep, f"layer {i}")
            with torch.inference_mode():
                run()
        finally:
            for h in handles:
                h.remove()
    return found
