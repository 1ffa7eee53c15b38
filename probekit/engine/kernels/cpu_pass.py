"""One attention pass per image on CPU, for layers short enough that one image's attention is one block.

Why: at ViT lengths (197 tokens) a small model's layer is a few hundred microseconds of matrix
products, and the blocked one pass (:mod:`probekit.engine.sink`) adds to them float32 copies of q,
k and v, a product buffer and a pass that scales it into the output: a dozen more tensor calls,
and buffers that the MLP between two layers has pushed out of the cache by the time they are read
again (measured with an MLP between two calls, ViT-S/16 at batch 1, one thread: 1.65 ms per layer
against SDPA's 1.0, and 1.45 ms this way; the whole call: benchmarks/RESULTS.md, section "Small
calls: probekit and timm AttentionExtract over the plain forward"). Here
each image takes three calls on the tensors the tap handed over, as
they are: ``q kᵀ`` scaled inside the matrix product (``baddbmm``, the strided views read in place),
the C row kernel (:mod:`probekit.engine.kernels.cpu`: softmax in place and every metric's per-row
terms), and ``P V`` written straight into the layer's output. The metrics' sums come from the
terms (``block.terms`` of :meth:`~probekit.Metric.row_values`), as on the blocked path.

It takes a layer only when every row-wise metric reads the C kernel's terms, the tap handed over
float32 q, k and v without an additive bias, and one image's logits and probabilities fit the block
budget; anything else (long sequences, biases, autocast, metrics that read the probabilities
themselves) goes the blocked path, unchanged.
"""

from __future__ import annotations

import torch

from probekit.attention import LayerAttention, Workspace
from probekit.engine.blocks import LayerBlocks
from probekit.engine.kernels import cpu as cpu_kernel
from probekit.engine.kernels.block_terms import layer_terms
from probekit.engine.rows import row_sum
from probekit.metric import Block, Metric
from probekit.metric.base import query_span
from probekit.tokens import TokenLayout

__all__ = ["applies", "run_layer"]


def _termed(m: Metric) -> bool:
    """Whether the metric's sums come from the C kernel's terms (as the sink's blocked path decides)."""
    return bool(m.kernel_terms) and m.kernel_terms <= cpu_kernel.TERMS


def applies(attn: LayerAttention, metrics: list[Metric], budget: int) -> bool:
    """Whether :func:`run_layer` takes this layer (see the module's docstring)."""
    q, k, v = attn.q, attn.k, attn.v
    if q is None or k is None or v is None or attn.probs_given is not None or attn.bias is not None:
        return False
    if q.device.type != "cpu" or cpu_kernel.library() is None or not metrics or not all(map(_termed, metrics)):
        return False
    if any(x.dtype != torch.float32 or x.dim() != 4 for x in (q, k, v)) or attn.out_dtype not in (None, torch.float32):
        return False
    if (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled():
        return False
    b, h, t = attn.shape
    if k.shape[2] != t or v.shape[2] != t or k.shape[1] != h or v.shape[1] != h or attn.scale <= 0:
        return False
    return h * t * t * 4 * 2 <= budget  # an image's logits and probabilities: one block, as blocks() counts it


def run_layer(comp: LayerBlocks, layout: TokenLayout, metrics: list[Metric], workspace: Workspace,
              ) -> dict[str, torch.Tensor | None]:
    """The layer's output into ``comp.output`` and each metric's sum over its query rows (``[B, H, ...]``;
    None where its :meth:`~probekit.Metric.row_values` declines the terms, e.g. a patch mass lost to
    underflow: the sink then takes its blocked path for that metric)."""
    attn = comp.attn
    q, k, v = attn._q, attn._k, attn.v
    assert v is not None, "applies() checked that the tap handed over v"
    b, h, t = attn.shape
    want = frozenset().union(*(m.kernel_terms for m in metrics))
    terms = layer_terms(b, h, t, layout.num_prefix, want, q.device, workspace)
    block = workspace.get("logits", (1, h, t, t), q.device)  # one image's logits, then its probabilities
    z = block[0]
    output = torch.empty(b, t, h, v.shape[-1], dtype=torch.float32, device=v.device).transpose(1, 2)
    rows = slice(0, t)
    for i in range(b):
        # q kᵀ · scale in one product, q and k read where the tap's qkv projection left them
        torch.baddbmm(z, q[i], k[i].transpose(-1, -2), beta=0, alpha=attn.scale, out=z)
        cpu_kernel.softmax_terms(block, block, slice(i, i + 1), rows, layout, terms)  # in place, normalized
        torch.matmul(z, v[i], out=output[i])  # [H, T, dv] straight into the output's layout
    comp.output = output
    spans = {m.label: query_span(m, layout) for m in metrics}
    return {m.label: row_sum(m, Block(rows=spans[m.label], layout=layout, terms=terms.rows(spans[m.label])))
            for m in metrics}
