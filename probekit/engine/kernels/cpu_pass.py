"""A layer's whole attention pass on CPU in one call of the C kernel: output and metric terms, no ``[T, T]`` block.

Why: at ViT lengths (197 tokens) a small model's layer is a few hundred microseconds of matrix
products. The blocked one pass (:mod:`probekit.engine.sink`) adds to them float32 copies of q, k
and v, a product buffer and a pass that scales it into the output, and even three calls per image
(``q kᵀ``, the row kernel, ``P V``) write and read back a ``[H, T, T]`` block: a dozen tensor calls
per layer and, at long sequences, blocks far larger than the cache. Here the whole layer is
one call (:func:`probekit.engine.kernels.cpu.attention`, ``pk_attention`` in ``_cpu_rows.c``): for
each (image, head) k is laid out once in key panels, and a few query rows at a time get their
logits (register tiles), their softmax and every metric's per-row terms (the C row kernel's
``row_terms``, the same code as the blocked path's) and their ``P V`` rows written straight into
the layer's output, while those rows sit in the L1 cache, with no ``[T, T]`` buffer at all. The
metrics' sums come from the terms (``block.terms`` of :meth:`~probekit.Metric.row_values`), as on
the blocked path. Measured: benchmarks/RESULTS.md, section "Small calls: probekit and timm
AttentionExtract over the plain forward".

It takes a layer, at any length, when every row-wise metric reads the C kernel's terms and the
tap handed over float32 q, k and v (last dimension contiguous) without an additive bias; anything
else (biases, autocast, grouped layers, metrics that read the probabilities themselves) goes the
blocked path, unchanged.
"""

from __future__ import annotations

import torch

from probekit.attention import LayerAttention, Workspace
from probekit.engine.kernels import cpu as cpu_kernel
from probekit.engine.kernels.block_terms import layer_terms
from probekit.engine.rows import row_sum
from probekit.metric import Block, Metric
from probekit.metric.base import query_span
from probekit.tokens import TokenLayout

__all__ = ["applies", "Prepared"]


def _termed(m: Metric) -> bool:
    """Whether the metric's sums come from the C kernel's terms (as the sink's blocked path decides)."""
    return bool(m.kernel_terms) and m.kernel_terms <= cpu_kernel.TERMS


def _plain_record(attn: LayerAttention) -> bool:
    """Whether the tap handed over q, k and v with no bias or probabilities, a float32 output, a positive
    scale and nothing for autograd to track: what every layer the pass takes has."""
    q, k, v = attn.q, attn.k, attn.v
    if q is None or k is None or v is None or attn.probs_given is not None or attn.bias is not None:
        return False
    if attn.out_dtype not in (None, torch.float32) or not attn.scale > 0:
        return False
    return not ((q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled())


def applies(attn: LayerAttention, metrics: list[Metric]) -> bool:
    """Whether :class:`Prepared` serves this layer (see the module's docstring)."""
    if not _plain_record(attn):
        return False
    q, k, v = attn._q, attn._k, attn.v
    assert v is not None  # _plain_record checked it
    if q.device.type != "cpu" or cpu_kernel.library() is None or not metrics or not all(map(_termed, metrics)):
        return False
    if any(x.dtype != torch.float32 or x.dim() != 4 or x.stride(3) != 1 for x in (q, k, v)):
        return False
    b, h, t = attn.shape
    return k.shape[1:3] == (h, t) and v.shape[1:3] == (h, t)


class Prepared:
    """The pass of one layer shape with its metrics: made at the first such layer, reused by the next ones.

    Holds the layer's terms (workspace buffers), each metric's :class:`~probekit.metric.Block` over its
    query rows of them, and the kernel's call with its arguments laid out
    (:class:`~probekit.engine.kernels.cpu.AttentionCall`): a layer it :meth:`takes` costs the output's
    allocation, one kernel call and each metric's sum.
    Why: a small model's layer is about a millisecond, and deciding, allocating and slicing the
    same things again for each of its layers was a tenth of it (issue 25).
    """

    def __init__(self, attn: LayerAttention, layout: TokenLayout, metrics: list[Metric], workspace: Workspace):
        q, k, v = attn._q, attn._k, attn.v
        assert v is not None, "applies() checked that the tap handed over v"
        b, h, t = attn.shape
        self.layout, self.metrics = layout, metrics
        want = frozenset().union(*(m.kernel_terms for m in metrics))
        terms = layer_terms(b, h, t, layout.num_prefix, want, q.device, workspace)
        self.out_shape = (b, t, h, v.shape[-1])
        # [B, H, T, dv] as a transposed view of [B, T, H, dv]: the layout every family reshapes to next
        out = torch.empty(self.out_shape, dtype=torch.float32, device=v.device).transpose(1, 2)
        self.call = cpu_kernel.AttentionCall(q, k, v, out, layout, terms, workspace)
        self.blocks = []
        #: each metric's query rows (what its sum is divided by for the mean)
        self.rows: dict[str, int] = {}
        for m in metrics:
            rows = query_span(m, layout)
            self.blocks.append((m, Block(rows=rows, layout=layout, terms=terms.rows(rows))))
            self.rows[m.label] = max(rows.stop - rows.start, 1)

    def takes(self, attn: LayerAttention, layout: object) -> bool:
        """Whether this layer is one :meth:`run` serves: the same layout, and q, k, v of the same shapes,
        strides and dtype, with no bias, probabilities or autocast output (what :func:`applies` checks)."""
        return (layout is self.layout and _plain_record(attn)
                and self.call.matches(attn._q, attn._k, attn.v))  # type: ignore[arg-type]  # v: _plain_record

    def run(self, attn: LayerAttention,
            output: bool = True) -> tuple[torch.Tensor | None, dict[str, torch.Tensor | None]]:
        """The layer's output ``[B, H, T, dv]`` (None with ``output=False``: the terms alone, for a layer whose
        output nothing will use) and each metric's sum over its query rows (None where its
        :meth:`~probekit.Metric.row_values` declines the terms, e.g. a patch mass lost to underflow)."""
        out = torch.empty(self.out_shape, dtype=torch.float32, device=attn.device).transpose(1, 2) if output else None
        self.call(attn._q, attn._k, attn.v, out, attn.scale)  # type: ignore[arg-type]  # takes() checked v
        return out, {m.label: row_sum(m, block) for m, block in self.blocks}
