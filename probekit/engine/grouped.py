"""The engine's path for layers that are not one global ``[T, T]`` attention (windows, pooled keys,
class attention): attention ``[B * G, H, Tq, Tk]`` reduced a few groups at a time.

Each row-wise metric that handles such layers (its ``requires`` admit them) reads them in the same
:meth:`~probekit.Metric.row_values` as global layers: a :class:`~probekit.metric.Block` with
``geometry`` and ``groups`` (each group's index within its image) set, every query row of a chunk
of ``n`` groups, and ``query_weight`` marking the rows of the metric's ``query_tokens``. The
engine weights the per-row values by it, adds the groups of each image and divides by the image's
query count, so a windowed layer's value is the mean over all the image's query patches, the
same as for a global layer. Memory is one chunk of windows
(sized to the same block budget as query rows of a global layer); nothing ``[T, T]`` is ever made.
"""

from __future__ import annotations

import torch

from probekit.attention import LayerAttention, Workspace
from probekit.engine.blocks import LayerBlocks
from probekit.engine.rows import row_sum
from probekit.geometry import LayerGeometry
from probekit.metric import Block

__all__ = ["group_blocks", "reduce_groups"]


def group_blocks(items: int, heads: int, tq: int, tk: int, budget_bytes: int):
    """Slices of the ``items`` groups whose float32 logits and probabilities fit ``budget_bytes`` (>= 1 group)."""
    per = max(1, heads * tq * tk * 4 * 2)
    step = max(1, min(items, budget_bytes // per))
    for i in range(0, items, step):
        yield slice(i, min(i + step, items))


def reduce_groups(metrics, attn: LayerAttention, geo: LayerGeometry, budget_bytes: int,
                  workspace: Workspace | None = None) -> dict[str, torch.Tensor]:
    """Per-image values ``{label: [B, H, ...]}`` of ``metrics`` on one grouped layer."""
    n, h, tq = attn.shape
    tk = attn.num_keys
    g = geo.groups
    acc: dict[str, torch.Tensor] = {}
    for sl in group_blocks(n, h, tq, tk, budget_bytes):
        z, p = LayerBlocks(attn.groups(sl)).block(workspace=workspace)
        idx = torch.arange(sl.start, sl.stop, device=p.device)
        groups, images = idx % g, idx // g
        for m in metrics:
            weight = geo.query_mask(m.query_tokens).to(p.device, p.dtype)[groups]
            part = row_sum(m, Block(rows=slice(0, tq), probs=p, logits=z, geometry=geo, groups=groups,
                                    query_weight=weight))
            assert part is not None  # a block with probabilities always gets an answer (row_sum)
            if m.label not in acc:
                acc[m.label] = part.new_zeros(n // g, *part.shape[1:])
            acc[m.label].index_add_(0, images, part)
        del z, p
    return {m.label: acc[m.label] / max(geo.queries_per_image(m.query_tokens), 1) for m in metrics}
