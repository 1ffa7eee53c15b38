"""Where a query's attention is centred, and how far it spreads around that centre (Walmer et al. 2023).

Both metrics read each query row's attention over the patch keys, renormalized to sum to 1 (as
Walmer et al. do: prefix keys dropped, their mass divided out), and its centroid, the
attention-weighted mean key position ``c_q = sum_k a_qk pos(k)``. Positions are those MAD uses
(:mod:`probekit.geometry`): patch centres on the grid, in ``units`` of ``px`` (grid steps x patch
size), ``patch`` (grid steps) or ``fraction`` (grid steps / (max(h, w) - 1), Walmer et al.'s
[0, 1] grid, the default here as in their code). On windowed and pooled layers the keys are
those each query sees, at their centres in the original image, in steps of the layer's own
query grid; on a class-attention layer the query is the class token at the image centre.

A row with no patch mass (all of it on prefix tokens, underflowed in a tap that hands over
probabilities) has no centroid; it counts as centred on its own query (offset 0, spread 0), as
Walmer et al.'s code counts such rows as empty.

=================  =====================================================  ======================================
metric             probekit (per image, mean over query patches)          Walmer et al. 2023 (code: analysis/
                                                                          attention_metrics.py)
=================  =====================================================  ======================================
attention_offset   ``mean_q |c_q - pos(q)|``                              ``|mean_{images, q} (c_q - pos(q))|``:
                                                                          the centroid of the aggregated map
                                                                          (``average_att_offset``), [0, 1] grid
attention_spread   ``mean_q sum_k a_qk |pos(k) - c_q|`` (``rms``:          none in their code; the issue's
                   ``mean_q sqrt(sum_k a_qk |pos(k) - c_q|^2)``)           "attention-weighted distance of keys
                                                                          from that centroid"
=================  =====================================================  ======================================

The paper's offset is the length of the *mean* offset vector (over queries and images), so
offsets in opposite directions cancel; probekit's is the mean *length*, a per-image value that
merges like MAD's and that is never below the paper's (triangle inequality); the two agree when
every query's centroid sits the same way from it (the paper's "offset local attention" heads).
The paper's own number is :func:`probekit.views.plots.aggregated.aggregated_offset` of the
``aggregated_map`` metric averaged over images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from probekit.geometry import LayerGeometry
from probekit.metric import Block, Metric
from probekit.tokens import TokenLayout

from .distance import Units

__all__ = ["AttentionOffset", "AttentionSpread", "grid_positions"]


def _unit_scale(units: str, stride: tuple[float, float], grid: tuple[int, int], px_in: bool) -> tuple[float, float]:
    """Per-axis factor from grid steps (``px_in``: from pixels of ``stride`` px cells) to ``units``."""
    py, px = float(stride[0]), float(stride[1])
    sy, sx = (1.0 / py, 1.0 / px) if px_in else (1.0, 1.0)
    if units == "px":
        return (sy * py, sx * px)
    if units == "fraction":
        f = 1.0 / max(max(grid) - 1, 1)
        return (sy * f, sx * f)
    return (sy, sx)


def grid_positions(layout: TokenLayout, units: str = "patch", device=None) -> torch.Tensor:
    """Patch centres ``(y, x)`` of ``layout``'s grid in ``units``, ``[N, 2]`` float32 (MAD's frame: the
    distances between these rows are :meth:`TokenLayout.pixel_distances` / ``grid_distances``).

    >>> grid_positions(TokenLayout(num_prefix=1, grid=(2, 3), patch_size=(16, 16)), "fraction")[-1].tolist()
    [0.5, 1.0]
    """
    scale = _unit_scale(units, layout.patch_size, layout.grid, px_in=False)
    return layout.coords(device) * torch.tensor(scale, device=device)


def _geometry_positions(geo: LayerGeometry, units: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key centres ``[G, Tq, 2]``, ``[G, Tk, 2]`` of a grouped layer in ``units``, float32."""
    def make():
        scale = torch.tensor(_unit_scale(units, geo.stride, geo.grid, px_in=True),
                             dtype=torch.float64)
        return ((geo.query_pos * scale).to(device=device, dtype=torch.float32),
                (geo.key_pos * scale).to(device=device, dtype=torch.float32))
    return geo.cached(("centroid_pos", units, str(device)), make)


class _CentroidMetric(Metric):
    """What offset and spread share: positions, renormalized rows and each row's centroid."""

    requires = ()  # windowed, pooled and class-attention layers: the keys each query sees (see the module)
    units: Units = "fraction"
    unit = property(lambda self: {"px": "px", "patch": "patches", "fraction": "fraction of grid"}[self.units])

    def _rows(self, block: Block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, keys, query, centroid)``: the block's rows over the patch keys renormalized
        ``[n, H, R, K]``, key positions (broadcastable to ``[n, H, R, K, 2]`` without the head and row
        axes), query positions and the centroids ``[n, H, R, 2]`` (a row with no mass: its query)."""
        a = block.patch_rows(renormalize=True)
        if block.geometry is None:
            layout = block.layout
            assert layout is not None
            pos = grid_positions(layout, self.units, a.device)
            p = layout.num_prefix
            keys, query = pos, pos[block.rows.start - p : block.rows.stop - p]  # [K, 2], [R, 2]
            c = torch.einsum("nhrk,kd->nhrd", a, keys)
        else:
            qpos, kpos = _geometry_positions(block.geometry, self.units, a.device)
            keys, query = kpos[block.groups][:, None, None], qpos[block.groups][:, None]  # [n,1,1,K,2], [n,1,R,2]
            c = torch.einsum("nhrk,nkd->nhrd", a, kpos[block.groups])
        c = c + (1 - a.sum(-1, keepdim=True)) * query  # a row with no patch mass sits on its query
        return a, keys, query, c

    def _uniform(self, layer: TokenLayout | LayerGeometry) -> float | None:
        """The value of uniform attention over the keys each query sees (a grouped layer's
        :meth:`LayerGeometry.uniform`), through :meth:`row_values` itself."""
        if not isinstance(layer, LayerGeometry):
            return None
        probs = layer.uniform()
        weight = layer.query_mask(self.query_tokens).float()
        groups = torch.arange(layer.groups)
        v = self.row_values(Block(rows=slice(0, layer.num_queries), probs=probs, geometry=layer, groups=groups,
                                  query_weight=weight))
        assert v is not None
        return float((v[:, 0] * weight).sum() / weight.sum())


class AttentionOffset(_CentroidMetric):
    """Distance from each query patch to the centroid of its attention, mean over query patches.

    For a query patch ``q`` with attention ``a_qk`` renormalized over the patch keys ``k``::

        c_q = sum_k a_qk pos(k),        offset_q = |c_q - pos(q)|

    then the mean over query patches (as MAD's). Identity attention has offset 0; attention on
    one key the distance to that key; uniform attention the distance of each query from the
    grid centre.

    Against Walmer et al. 2023 (``average_att_offset``): theirs is ``|mean_{images, q} (c_q - pos(q))|``,
    the length of the mean offset vector (the centroid of the aggregated map), in the same [0, 1]
    grid units; here ``mean_q |c_q - pos(q)|``, the mean length, per image (mergeable like MAD's,
    never below theirs; equal when every centroid lies the same way from its query, as in their
    offset local heads). Theirs is :func:`~probekit.views.plots.aggregated.aggregated_offset`
    of the image-mean ``aggregated_map``.

    Args:
        units: ``"fraction"`` (default: Walmer et al.'s [0, 1] grid, grid steps / (max(h, w) - 1)),
            ``"patch"`` (grid steps) or ``"px"``.

    Returns:
        ``[B, H]`` per image and head.

    >>> lay = TokenLayout(num_prefix=0, grid=(1, 3), patch_size=(16, 16))
    >>> right = torch.tensor([[0.0, 1, 0], [0, 0, 1], [0, 0, 1]])[None, None]  # the next key, the last at the edge
    >>> round(AttentionOffset(units="patch").compute(right, lay).item(), 4)   # (1 + 1 + 0) / 3
    0.6667
    """

    name = "attention_offset"
    display_name = "attention offset"
    description = "distance from each query patch to its attention centroid over patch keys (rows renormalized)"
    citation = "Walmer et al. 2023, Teaching Matters: Investigating the Role of Supervision in Vision Transformers"

    def reference_value(self, layer: TokenLayout | LayerGeometry) -> float | None:
        """Offset of uniform attention: the mean distance of the query patches from the grid centre
        (on a grouped layer, of uniform attention over the keys each query sees)."""
        if not isinstance(layer, TokenLayout):
            return self._uniform(layer)
        h, w = layer.grid
        sy, sx = _unit_scale(self.units, layer.patch_size, layer.grid, px_in=False)
        ys, xs = np.divmod(np.arange(h * w), w)
        return float(np.hypot((ys - (h - 1) / 2) * sy, (xs - (w - 1) / 2) * sx).mean())

    def row_values(self, block: Block) -> torch.Tensor | None:
        """``|c_q - pos(q)|`` per query row ``[n, H, R]``."""
        _, _, query, c = self._rows(block)
        return (c - query).norm(dim=-1)


class AttentionSpread(_CentroidMetric):
    """Attention-weighted distance of the keys from the attention's centroid, mean over query patches.

    For a query patch ``q`` with attention ``a_qk`` renormalized over the patch keys ``k`` and its
    centroid ``c_q = sum_k a_qk pos(k)``::

        spread_q = sum_k a_qk |pos(k) - c_q|                (measure="mean", default)
        spread_q = sqrt(sum_k a_qk |pos(k) - c_q|^2)        (measure="rms": the radius of gyration)

    then the mean over query patches. Where MAD measures how far a head looks from its query,
    spread measures how wide its attention is wherever it is centred: a head that looks far away
    at one patch has a large MAD (and offset) and spread 0. Identity attention and attention on
    any one key have spread 0; uniform attention over an ``h x w`` grid has the mean distance of
    the patches from the grid centre (``rms``: ``sqrt(((h^2 - 1) + (w^2 - 1)) / 12)`` grid steps).
    Against Walmer et al. 2023: their code has no spread (their per-head spread measures are MAD and
    the aggregated map's extent); "mean" follows issue 23's wording, the attention-weighted mean
    distance from the centroid, in the same units and renormalized rows as their MAD and offset;
    "rms" is the radius of gyration, the usual second-moment spread.

    Args:
        units: ``"fraction"`` (default, Walmer et al.'s [0, 1] grid), ``"patch"`` or ``"px"``.
        measure: ``"mean"`` (mean distance) or ``"rms"`` (root of the weighted variance).

    Returns:
        ``[B, H]`` per image and head.

    >>> lay = TokenLayout(num_prefix=0, grid=(1, 3), patch_size=(16, 16))
    >>> halves = torch.tensor([[0.5, 0, 0.5]]).expand(3, 3)[None, None]   # half on each end: centroid in the middle
    >>> AttentionSpread(units="patch").compute(halves, lay).item()
    1.0
    """

    name = "attention_spread"
    display_name = "attention spread"
    description = "attention-weighted distance of patch keys from each query's attention centroid"
    citation = "Walmer et al. 2023, Teaching Matters: Investigating the Role of Supervision in Vision Transformers"

    measure: Literal["mean", "rms"] = "mean"

    def reference_value(self, layer: TokenLayout | LayerGeometry) -> float | None:
        """Spread of uniform attention: the mean distance of the patches from the grid centre
        (``rms``: the root of the grid's variance, ``sqrt(((h^2 - 1) sy^2 + (w^2 - 1) sx^2) / 12)``)."""
        if not isinstance(layer, TokenLayout):
            return self._uniform(layer)
        h, w = layer.grid
        sy, sx = _unit_scale(self.units, layer.patch_size, layer.grid, px_in=False)
        if self.measure == "rms":
            return float(np.sqrt(((h * h - 1) * sy * sy + (w * w - 1) * sx * sx) / 12))
        ys, xs = np.divmod(np.arange(h * w), w)
        return float(np.hypot((ys - (h - 1) / 2) * sy, (xs - (w - 1) / 2) * sx).mean())

    def row_values(self, block: Block) -> torch.Tensor | None:
        """``spread_q`` per query row ``[n, H, R]``."""
        a, keys, _, c = self._rows(block)
        dy = keys[..., 0] - c[..., 0, None]
        dx = keys[..., 1] - c[..., 1, None]
        d2 = dy * dy + dx * dx
        if self.measure == "rms":
            return (a * d2).sum(-1).clamp_min(0).sqrt()
        return (a * d2.sqrt()).sum(-1)
