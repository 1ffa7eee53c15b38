"""Query-centred aggregated attention maps (Walmer et al. 2023, "avg-aligned-att-on-token").

Each query patch's attention over the patch grid, shifted so that the query sits at the centre
of a ``(2h - 1) x (2w - 1)`` canvas, then averaged over the query patches (and, in a figure, over
the images): cell ``(h - 1 + dy, w - 1 + dx)`` holds the attention a query pays on average to the
patch ``dy`` rows below and ``dx`` columns right of it. A head that looks at its own patch is a
single 1 at the centre; Walmer et al.'s "offset local attention" heads are one bright cell next
to it; a global head is a broad blob.

============================  ==========================================  ===========================================
                              probekit ``aggregated_map``                 Walmer et al. 2023 (``AvgAlignedAttentionOn
                                                                          Token``, analysis/attention_metrics.py)
============================  ==========================================  ===========================================
rows                          patch queries, patch keys, renormalized     the same (CLS removed from queries and keys,
                              (``renormalize=False``: the raw rows)       mass renormalized)
canvas                        ``(2h - 1) x (2w - 1)``, any grid           ``(2K - 1) x (2K - 1)``, square grids only
average                       per image over its queries; images: the     sum over images and queries / (batches x
                              mean of the per-image maps (they sum to 1)  queries): the map sums to the batch size,
                                                                          which their offset step divides out
offset                        ``aggregated_offset`` of the image-mean     ``average_att_offset``: the same centroid,
                              map (``probekit.views.plots.aggregated``)    on the [-1, 1] canvas = [0, 1] grid units
============================  ==========================================  ===========================================

Per image the map is ``L x H x (2h - 1) x (2w - 1)`` values (for 14 x 14 patches, 12 layers and
12 heads: 105 k float32, 0.42 MB per image in ``Results.arrays``, 3.7 times ``cls_map``'s): a run
keeps every image's, as it does ``cls_map``'s.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from probekit.geometry import LayerGeometry
from probekit.metric import Block, Metric

__all__ = ["AggregatedMap"]


@lru_cache(maxsize=16)
def _offset_index(grid: tuple[int, int], device: str) -> torch.Tensor:
    """Canvas cell of every (query patch, key patch) pair on ``grid``, ``[N, N]`` long, row-major."""
    h, w = grid
    r, c = np.divmod(np.arange(h * w), w)
    idx = (r[None, :] - r[:, None] + h - 1) * (2 * w - 1) + (c[None, :] - c[:, None] + w - 1)
    return torch.from_numpy(idx).to(device)


def _window_index(geo: LayerGeometry, device) -> torch.Tensor:
    """Canvas cell of every (query, key) pair of each group of a windowed layer, ``[G, Tq, Tk]``; the
    pairs with a padding or prefix token go to one extra cell past the canvas."""
    def make():
        h, w = geo.grid
        cell = geo.key_cell.long()  # queries are the keys (a square layer): the same cells
        r, c = cell // w, cell % w
        idx = (r[:, None, :] - r[:, :, None] + h - 1) * (2 * w - 1) + (c[:, None, :] - c[:, :, None] + w - 1)
        bad = (cell[:, :, None] < 0) | (cell[:, None, :] < 0)
        return torch.where(bad, (2 * h - 1) * (2 * w - 1), idx).to(device)
    return geo.cached(("aggregated_index", str(device)), make)


class AggregatedMap(Metric):
    """Each query patch's attention re-centred on the query, averaged over query patches: a
    ``(2h - 1) x (2w - 1)`` map per head (Walmer et al. 2023, Fig. 3 and the "offset local
    attention" heads; see the module docstring for their definition side by side).

    ``M[dy + h - 1, dx + w - 1] = mean_q a[q, q + (dy, dx)]`` over query patches ``q`` whose
    neighbour ``q + (dy, dx)`` lies on the grid, with ``a`` the query's row over the patch keys,
    renormalized to sum to 1 (``renormalize=False``: the raw softmax row, summing to the patch
    mass). Each query's row lands whole on the canvas, so a map sums to 1 (renormalized).

    On windowed layers (Swin, SAM) the keys each query sees, on the layer's own grid (so a staged
    model's maps differ in size between stages; shorter ones are padded with NaN). Pooled-key
    and class-attention layers have no common grid of queries and keys: refused before the run
    (``requires``: the same tokens as queries and keys, patch queries).

    Against Walmer et al.'s ``AvgAlignedAttentionOnToken``: the same rows (patch queries and keys,
    renormalized) pasted at the same offsets; theirs needs a square grid and sums over images and
    queries divided by batches x queries (a map summing to the batch size, which their offset step
    renormalizes away); here each image's map is its mean over queries (summing to 1), and their
    offset is :func:`~probekit.views.plots.aggregated.aggregated_offset` of the mean over images.

    Args:
        renormalize: rescale each row to sum to 1 over the patch keys (default, as Walmer et al.).

    Returns:
        ``[B, H, 2h - 1, 2w - 1]`` per image and head (a map: stored in ``Results.arrays``).

    >>> import probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=0, grid=(2, 2), patch_size=(16, 16))
    >>> AggregatedMap().compute(torch.eye(4)[None, None], lay)[0, 0].tolist()   # identity: 1 at the centre
    [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """

    name = "aggregated_map"
    display_name = "aggregated attention map"
    description = "query-centred attention averaged over query patches: a (2h-1) x (2w-1) map per head"
    citation = "Walmer et al. 2023, Teaching Matters: Investigating the Role of Supervision in Vision Transformers"
    requires = ("square", "patch_queries")  # global and windowed layers: queries and keys on one grid
    is_map = True
    unit = "fraction of attention"

    renormalize: bool = True

    def row_values(self, block: Block) -> torch.Tensor | None:
        """The block's rows re-centred and summed (weighted by ``query_weight``): a row axis of 1,
        ``[n, H, 1, 2h - 1, 2w - 1]`` (a canvas per row would be ``4 N`` times the block)."""
        a = block.patch_rows(self.renormalize)
        n, heads, r, k = a.shape
        if block.geometry is None:
            layout = block.layout
            assert layout is not None
            (h, w), p = layout.grid, layout.num_prefix
            idx = _offset_index(layout.grid, str(a.device))[block.rows.start - p : block.rows.stop - p]
            idx = idx.reshape(1, 1, r * k).expand(n, heads, -1)
        else:
            geo = block.geometry
            (h, w) = geo.grid
            assert block.query_weight is not None
            a = a * block.query_weight.to(a.dtype)[:, None, :, None]
            idx = _window_index(geo, a.device)[block.groups].reshape(n, 1, r * k).expand(n, heads, -1)
        size = (2 * h - 1) * (2 * w - 1)
        out = a.new_zeros(n, heads, size + 1)  # the last cell collects padding and prefix pairs
        out.scatter_add_(2, idx, a.reshape(n, heads, r * k))
        return out[..., :size].reshape(n, heads, 1, 2 * h - 1, 2 * w - 1)
