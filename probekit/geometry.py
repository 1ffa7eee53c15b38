"""Per-layer attention geometry: where every query and key token sits, and which keys each query sees.

A plain ViT is one :class:`~probekit.tokens.TokenLayout` for every layer: prefix tokens, then a
grid, every query seeing every key. Many vision transformers are not: Swin and the SAM/ViTDet
encoder attend inside windows (shifted by half a window every other Swin block), MViTv2 pools its
keys to a coarser grid, PiT and Swin shrink the grid between stages, and CaiT ends with
class-attention layers whose only query is the class token. A :class:`LayerGeometry` describes one
such layer the same way for all of them:

- the layer's attention is ``G`` independent groups (windows), reported as ``[B * G, H, Tq, Tk]``
  with the group index fastest (``b * G + g``), as ``window_partition`` orders them;
- every query and key token of every group has a centre in the *original image's* pixel frame
  ``(y, x)`` (a shifted window's cyclic roll undone; a pooled key at the centre of the window its
  pooling kernel reads; a prefix token at the image centre) and a kind: ``patch``, ``pad``
  (padding added to fill a window: excluded from queries and keys, like a prefix token), or a
  prefix kind (``cls``, ``dist``, ``reg``);
- ``visible`` says which keys each query can see (a shifted window's mask); None: all of them.

Memory stays per window: a windowed layer holds ``[G, Tw, Tw]`` tables, never ``[T, T]`` over
the image. Global layers stay :class:`TokenLayout` s (the fast path of the engine); a
:class:`ModelGeometry` maps each layer to one or the other.

Conventions (what the distance metrics report on such layers):

- MAD of a windowed or pooled layer is the mean over the layer's query patches of the
  attention-weighted distance to the keys each can see (its window, its pooled key set);
- in px by default: Euclidean distance between token centres in input pixels, so values of
  different stages, windows and models are comparable;
- ``patch``: the same distance in steps of the layer's own query grid (its stride in px);
- ``fraction``: ``patch`` / ``(max(h, w) - 1)`` of the layer's query grid, i.e. relative to the
  extent of the image as that layer tiles it (for a global ViT exactly Walmer et al.'s [0, 1]
  grid, today's definition);
- a layer without patch queries (class attention) is measured from its class token, which sits at
  the image centre: MAD is then the spread of the CLS attention around the centre, exactly the
  ``queries="cls"`` value of a global layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from probekit.errors import LayoutError
from probekit.tokens import TokenLayout, pair

__all__ = ["ChannelAttention", "KINDS", "LayerGeometry", "ModelGeometry", "REQUIREMENTS"]

#: token kinds; codes are indices into this tuple
KINDS = ("patch", "pad", "cls", "dist", "reg")
PATCH, PAD = 0, 1

#: what a metric can require of a layer (``Metric.requires``), and how to say it is missing
REQUIREMENTS = {
    "tokens": "attention over tokens (every attention metric needs it)",
    "global": "global attention (every query sees every token of one [T, T] matrix)",
    "square": "the same tokens as queries and as keys",
    "patch_queries": "patch tokens as queries",
    "cls": "a class token",
}


def _kind_codes(kinds) -> list[int]:
    try:
        return [KINDS.index(k) for k in kinds]
    except ValueError:
        raise LayoutError(
            f"Unknown token kind in {tuple(kinds)}; a geometry knows {', '.join(KINDS)}. Name prefix "
            "tokens 'cls', 'dist' or 'reg'."
        ) from None


def _centres(grid, stride, offset=(0.0, 0.0)) -> torch.Tensor:
    """Centres ``[h * w, 2]`` (row-major) of a grid of cells of ``stride`` px, first at ``offset``."""
    h, w = grid
    i = torch.arange(h * w, dtype=torch.float64)
    return torch.stack([(i // w + 0.5) * stride[0] + offset[0], (i % w + 0.5) * stride[1] + offset[1]], -1)


@dataclass(frozen=True, eq=False)
class LayerGeometry:
    """One layer's attention geometry (see the module docstring for the conventions).

    Args:
        kind: ``"global"``, ``"window"``, ``"pooled"`` or ``"class"`` (words for people and plots).
        query_pos, key_pos: token centres in input pixels ``(y, x)``, ``[G, Tq, 2]`` / ``[G, Tk, 2]``.
        query_kind, key_kind: codes into :data:`KINDS`, ``[G, Tq]`` / ``[G, Tk]``.
        grid: the layer's query grid ``(h, w)`` over the image; ``stride``: its step in px.
        image_size: pixels the grid covers ``(H, W)``.
        key_grid: the grid key patches lie on (pooled keys: coarser); ``key_cell``: each key's
            row-major cell in it, ``-1`` for prefix and padding, ``[G, Tk]``.
        visible: ``[G, Tq, Tk]`` bool, which keys each query sees; None: all.
        window: window size in tokens (``window`` layers), for descriptions.
        base_grid: the model's patch grid at its input (maps of coarser layers are drawn on it).
    """

    kind: str
    query_pos: torch.Tensor
    key_pos: torch.Tensor
    query_kind: torch.Tensor
    key_kind: torch.Tensor
    grid: tuple[int, int]
    stride: tuple[int, int]
    image_size: tuple[int, int]
    key_grid: tuple[int, int]
    key_cell: torch.Tensor
    visible: torch.Tensor | None = None
    window: tuple[int, int] | None = None
    base_grid: tuple[int, int] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        g, tq, _ = self.query_pos.shape
        if (self.key_pos.shape[0] != g or self.query_kind.shape != (g, tq)
                or self.key_kind.shape != self.key_pos.shape[:2]):
            raise LayoutError("LayerGeometry: positions and kinds disagree in shape.")

    # -- shape ----------------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.query_pos.shape[0]

    @property
    def num_queries(self) -> int:
        """Query tokens per group ``Tq`` (all kinds)."""
        return self.query_pos.shape[1]

    @property
    def num_keys(self) -> int:
        return self.key_pos.shape[1]

    def check(self, items: int, tq: int, tk: int, layer: int | str = "?") -> None:
        """Raise :class:`LayoutError` unless attention ``[items, H, tq, tk]`` fits this geometry."""
        if items % self.groups or tq != self.num_queries or tk != self.num_keys:
            raise LayoutError(
                f"Layer {layer}: the model's attention has {items} groups of {tq} queries x {tk} keys, but "
                f"its geometry describes {self.groups} {self.kind} groups per image of {self.num_queries} x "
                f"{self.num_keys}. The adapter's geometry does not match this input; report the model name."
            )

    # -- which tokens count ---------------------------------------------------------------------
    def has_kind(self, kind: str) -> bool:
        return bool((self.query_kind == KINDS.index(kind)).any() or (self.key_kind == KINDS.index(kind)).any())

    def query_mask(self, which: str = "patches") -> torch.Tensor:
        """``[G, Tq]`` bool: the queries a value is averaged over.

        ``"patches"``: the patch queries, or the class token where the layer has none (class
        attention); ``"cls"``: the class-token queries; ``"all"``: every query but padding.
        """
        if which == "all":
            return self.query_kind != PAD
        patch = self.query_kind == PATCH
        cls = self.query_kind == KINDS.index("cls")
        if which == "cls" or not bool(patch.any()):
            if not bool(cls.any()):
                raise LayoutError(
                    f"This {self.kind} layer has no class-token query ({self.describe()}). Use the patch "
                    "queries (queries='patches' / query='mean')."
                )
            return cls
        return patch

    def queries_per_image(self, which: str = "patches") -> int:
        return int(self.query_mask(which).sum())

    def key_mask(self, kind: str = "patch") -> torch.Tensor:
        """``[G, Tk]`` bool: keys of ``kind`` (``"prefix"``: every prefix kind)."""
        if kind == "prefix":
            return self.key_kind >= KINDS.index("cls")
        return self.key_kind == KINDS.index(kind)

    def visible_patch_keys(self, device=None) -> torch.Tensor:
        """``[G, Tq, Tk]`` float: 1 where a query sees a patch key (padding and prefix keys 0)."""
        return self.cached(("vpk", str(device)), lambda: self._visible_patch(device))

    def _visible_patch(self, device) -> torch.Tensor:
        m = self.key_mask("patch")[:, None, :].expand(-1, self.num_queries, -1)
        if self.visible is not None:
            m = m & self.visible
        return m.to(device=device, dtype=torch.float32)

    # -- distances --------------------------------------------------------------------------------
    def distances(self, units: str = "px", device=None, dtype=torch.float32) -> torch.Tensor:
        """Query-key distances ``[G, Tq, Tk]`` in ``units`` (``px``, ``patch``, ``fraction``), cached."""
        return self.cached(("d", units, str(device), dtype),
                           lambda: self._distances(units).to(device=device, dtype=dtype))

    def _distances(self, units: str) -> torch.Tensor:
        diff = self.query_pos[:, :, None, :] - self.key_pos[:, None, :, :]
        if units != "px":
            diff = diff / torch.tensor(self.stride, dtype=diff.dtype)
        d = diff.norm(dim=-1)
        if units == "fraction":
            d = d / max(max(self.grid) - 1, 1)
        return d

    def cached(self, key, make):
        """``make()``, computed once per ``key`` for this geometry (metrics keep their tables here)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- reference ----------------------------------------------------------------------------------
    def uniform(self) -> torch.Tensor:
        """Uniform attention over each query's visible keys (all kinds), ``[G, 1, Tq, Tk]`` float32."""
        vis = torch.ones(self.groups, self.num_queries, self.num_keys, dtype=torch.bool)
        if self.visible is not None:
            vis = self.visible
        p = vis.float()
        return (p / p.sum(-1, keepdim=True).clamp_min(1))[:, None]

    def describe(self) -> str:
        win = f" of {self.window[0]}x{self.window[1]}" if self.window else ""
        return (
            f"{self.kind}: {self.groups} group(s){win}, {self.num_queries} queries x {self.num_keys} keys; "
            f"query grid {self.grid[0]}x{self.grid[1]} at {self.stride[0]}x{self.stride[1]} px"
        )

    def summary(self) -> dict:
        """JSON-able description (run metadata, plots)."""
        return {"kind": self.kind, "grid": list(self.grid), "stride": list(self.stride),
                "groups": self.groups, "queries": self.num_queries, "keys": self.num_keys,
                "window": None if self.window is None else list(self.window)}

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_layout(cls, layout: TokenLayout) -> LayerGeometry:
        """The global layer of ``layout`` as a geometry (one group, every query sees every token)."""
        h, w = layout.grid
        img = layout.image_size
        centre = torch.tensor([[img[0] / 2, img[1] / 2]], dtype=torch.float64)
        pos = torch.cat([centre.expand(layout.num_prefix, 2), _centres(layout.grid, layout.patch_size)])[None]
        kinds = torch.tensor(_kind_codes(layout.prefix_kinds) + [PATCH] * (h * w), dtype=torch.int8)[None]
        cell = torch.cat([torch.full((layout.num_prefix,), -1), torch.arange(h * w)])[None]
        return cls("global", pos, pos, kinds, kinds, layout.grid, layout.patch_size, img, layout.grid, cell)

    @classmethod
    def windows(cls, grid, stride, window, shift=(0, 0), image_size=None, base_grid=None,
                pad_first: bool = False) -> LayerGeometry:
        """Window attention over a ``grid`` of ``stride`` px tokens (Swin, SAM/ViTDet, Hiera-like).

        The grid is (cyclically rolled by ``-shift`` then) padded at the bottom and right to whole
        windows and cut into ``window`` windows, row-major, as Swin and ViTDet do. Rolled-frame
        cell ``(r, c)`` is original cell ``((r + sy) mod h, (c + sx) mod w)``; cells past the grid are
        padding. With a shift, a query sees only keys of its own region (Swin's mask: the three
        bands ``[0, Hp - wh)``, ``[Hp - wh, Hp - sy)``, ``[Hp - sy, Hp)`` per axis), so keys brought
        next to it by the roll from the far side of the image are hidden.

        ``pad_first``: pad, then roll the padded grid (transformers' Swin): cell ``(r, c)`` is padded
        cell ``((r + sy) mod Hp, (c + sx) mod Wp)``, padding wherever that lies past the grid.
        """
        (h, w), (ph, pw), (wh, ww), (sy, sx) = pair(grid), pair(stride), pair(window), pair(shift)
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        r = torch.arange(hp)[:, None].expand(hp, wp)
        c = torch.arange(wp)[None, :].expand(hp, wp)
        if pad_first:
            orow, ocol = (r + sy) % hp, (c + sx) % wp
            pad = (orow >= h) | (ocol >= w)
        else:
            pad = (r >= h) | (c >= w)
            orow, ocol = (r + sy) % h, (c + sx) % w
        pos = torch.stack([(orow + 0.5) * ph, (ocol + 0.5) * pw], -1).to(torch.float64)
        kind = torch.where(pad, PAD, PATCH).to(torch.int8)
        cell = torch.where(pad, -1, orow * w + ocol)

        def split(t):  # [hp, wp, ...] -> [nW, wh * ww, ...] in window_partition's order
            t = t.reshape(hp // wh, wh, wp // ww, ww, *t.shape[2:]).transpose(1, 2)
            return t.reshape((hp // wh) * (wp // ww), wh * ww, *t.shape[4:])

        pos, kind, cell = split(pos), split(kind), split(cell)
        visible = None
        if sy or sx:
            def band(i, n, win, s):
                return torch.where(i < n - win, 0, torch.where(i < n - s, 1, 2)) if s else torch.zeros_like(i)

            region = split(band(r, hp, wh, sy) * 3 + band(c, wp, ww, sx))
            visible = region[:, :, None] == region[:, None, :]
        img = image_size or (h * ph, w * pw)
        return cls("window", pos, pos, kind, kind, (h, w), (ph, pw), pair(img), (h, w), cell, visible, (wh, ww),
                   None if base_grid is None else pair(base_grid))

    @classmethod
    def pooled(cls, grid, stride, kv_grid, kv_cell, prefix_kinds=(), image_size=None,
               base_grid=None) -> LayerGeometry:
        """Global attention from a grid of queries to keys pooled onto another grid (MViTv2's pooled k/v,
        Twins' global sub-sampled attention).

        Queries sit at the centres of their ``stride`` px cells, pooled key ``(i, j)`` at the centre of
        its ``kv_cell`` px cell, ``((i + 0.5) * kv_cell)``: the convention follows the pooling stride,
        not the kernel (MViTv2's 3x3 kernel reads one query cell beyond its own). Prefix tokens (not
        pooled) lead both queries and keys and sit at the image centre.
        """
        (h, w), (ph, pw) = pair(grid), pair(stride)
        (kh, kw), kc = pair(kv_grid), pair(kv_cell)
        img = pair(image_size or (h * ph, w * pw))
        n = len(prefix_kinds)
        centre = torch.tensor([[img[0] / 2, img[1] / 2]], dtype=torch.float64).expand(n, 2)
        qpos = torch.cat([centre, _centres((h, w), (ph, pw))])[None]
        kpos = torch.cat([centre, _centres((kh, kw), kc)])[None]
        pre = _kind_codes(prefix_kinds)
        qkind = torch.tensor(pre + [PATCH] * (h * w), dtype=torch.int8)[None]
        kkind = torch.tensor(pre + [PATCH] * (kh * kw), dtype=torch.int8)[None]
        cell = torch.cat([torch.full((n,), -1), torch.arange(kh * kw)])[None]
        return cls("pooled", qpos, kpos, qkind, kkind, (h, w), (ph, pw), img, (kh, kw), cell,
                   base_grid=None if base_grid is None else pair(base_grid))

    @classmethod
    def class_attention(cls, layout: TokenLayout) -> LayerGeometry:
        """CaiT/XCiT class attention: the class token (at the image centre) is the only query; the keys
        are the class token and the patches of ``layout``."""
        g = cls.from_layout(layout)
        i = layout.prefix_kinds.index("cls") if "cls" in layout.prefix_kinds else None
        if i is None:
            raise LayoutError(f"Class attention needs a class token; the layout has none ({layout.describe()}).")
        return cls("class", g.query_pos[:, i : i + 1], g.key_pos, g.query_kind[:, i : i + 1], g.key_kind,
                   g.grid, g.stride, g.image_size, g.key_grid, g.key_cell)

    # -- what metrics may ask for -----------------------------------------------------------------
    def lacks(self, requirement: str) -> str | None:
        """Why this layer does not meet ``requirement`` (a key of :data:`REQUIREMENTS`), or None."""
        if requirement == "global":
            return f"is a {self.kind} layer ({self.describe()})"
        if requirement == "square" and self.kind in ("pooled", "class"):
            return f"attends from {self.num_queries} queries to {self.num_keys} other tokens ({self.kind})"
        if requirement == "patch_queries" and not bool((self.query_kind == PATCH).any()):
            return "has no patch queries (its only query is the class token)"
        if requirement == "cls" and not self.has_kind("cls"):
            return "has no class token"
        return None


class ChannelAttention:
    """A layer that attends over channels, not tokens (XCiT's cross-covariance attention): its
    ``[d, d]`` attention has no query or key with a place in the image, so no attention metric
    describes it; the taps do not report it, and metrics refuse it before the forward pass."""

    kind = "channels"

    def lacks(self, requirement: str) -> str | None:
        return ("attends over channels (cross-covariance attention, XCiT), not over image tokens; probe its "
                "class-attention layers instead")

    def summary(self) -> dict:
        return {"kind": self.kind, "grid": None, "stride": None, "groups": 1, "queries": None, "keys": None,
                "window": None}


def layout_lacks(layout: TokenLayout, requirement: str) -> str | None:
    """:meth:`LayerGeometry.lacks` for a global :class:`TokenLayout` layer."""
    if requirement == "cls" and "cls" not in layout.prefix_kinds:
        return f"has no class token ({layout.describe()})"
    return None


class ModelGeometry:
    """Each layer's geometry for one input: a :class:`TokenLayout` (global) or a :class:`LayerGeometry`.

    Args:
        layout: the input's token layout (what the patch embedding produces).
        layers: per-layer geometries; layers not given are global over ``layout``.
        num_layers: how many layers the model has (for :meth:`stage_starts`).
    """

    def __init__(self, layout: TokenLayout, layers: dict | None = None, num_layers: int | None = None):
        self.layout = layout
        self.layers = dict(layers or {})
        self.num_layers = num_layers if num_layers is not None else (max(self.layers, default=-1) + 1)

    def layer(self, i: int) -> TokenLayout | LayerGeometry:
        return self.layers.get(i, self.layout)

    def is_global(self, i: int) -> bool:
        return isinstance(self.layer(i), TokenLayout)

    def summary(self, i: int) -> dict:
        g = self.layer(i)
        if isinstance(g, TokenLayout):
            return {"kind": "global", "grid": list(g.grid), "stride": list(g.patch_size), "groups": 1,
                    "queries": g.num_tokens, "keys": g.num_tokens, "window": None}
        return g.summary()

    def meta(self) -> dict | None:
        """What ``Results.meta["geometry"]`` records: per layer its kind, grid, stride and window, and
        where stages start (the engine adds each metric's per-layer reference value). None for
        a model whose every layer is global over its input layout (the layout says it all)."""
        if not self.layers:
            return None
        layers = []
        for i in range(self.num_layers):
            info = self.summary(i)
            layers.append(info)
        return {"layers": layers, "stage_starts": self.stage_starts()}

    def stage_starts(self) -> list[int]:
        """Layers where the query grid changes from the layer before (the first layer excluded)."""
        out, prev = [], None
        for i in range(self.num_layers):
            grid = self.summary(i)["grid"]
            if grid is None:  # channel attention: no grid
                continue
            grid = tuple(grid)
            if prev is not None and grid != prev:
                out.append(i)
            prev = grid
        return out
