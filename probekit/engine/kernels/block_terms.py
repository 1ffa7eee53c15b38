"""The per-row sums of a block of probabilities that metrics share, made while the softmax writes it.

Why: entropy over the patch keys needs, per query row, ``lse``, the patch mass ``sum_patch p``
and ``<p, z>_patch`` (``H = lse + ln s - <p, z>_patch / s``). Read from the finished block,
those sums cost two more passes over its multi-MB logits and probabilities; made chunk by chunk
right after the softmax has written each chunk of rows, they read it from the L2 cache
(measured: benchmarks/RESULTS.md, section "Smaller engine choices").

On CPU the C row kernel (:mod:`probekit.engine.kernels.cpu`) makes the softmax and all these sums, and
MAD's distance sums and the prefix masses besides, in one pass over each row, in about the time
torch's softmax alone takes (same section). Elsewhere (CUDA, or no C compiler) PyTorch makes
:data:`BLOCK_TERMS` chunk by chunk.

The sums are the fused GPU kernel's :class:`~probekit.metric.terms.RowTerms`, for the rows of one
block: a metric whose ``kernel_terms`` lie within :func:`terms_served` is served through the
same :meth:`~probekit.Metric.row_values` (``block.terms``) on the blocked path as on the kernel (and is
asked again with probabilities where it returns None, e.g. a patch mass that underflowed float32).
"""

from __future__ import annotations

import torch

from probekit.attention import Workspace
from probekit.engine.kernels import cpu as cpu_kernel
from probekit.metric.patch_keys import log_partition
from probekit.metric.terms import RowTerms
from probekit.tokens import TokenLayout

__all__ = ["BLOCK_TERMS", "layer_terms", "softmax_with_terms", "terms_served"]

#: Terms the PyTorch blocked path makes next to the softmax.
BLOCK_TERMS = frozenset({"lse", "patch_mass", "patch_logit"})


def terms_served(device: torch.device) -> frozenset[str]:
    """The terms blocks on ``device`` come with: the C row kernel's on CPU where it built, else :data:`BLOCK_TERMS`."""
    if torch.device(device).type == "cpu" and cpu_kernel.library() is not None:
        return cpu_kernel.TERMS
    return BLOCK_TERMS


def layer_terms(batch: int, heads: int, tokens: int, num_prefix: int, want, device,
                workspace: Workspace | None = None) -> RowTerms:
    """Empty per-row terms ``[B, H, T]`` of one layer for the terms ``want`` (``lse`` and ``patch_mass`` always).

    With ``workspace``, its buffers (the same for every layer: what metrics make of the terms,
    ``block.terms`` in :meth:`~probekit.Metric.row_values`, is a new tensor, read before the next
    layer); else new tensors.
    """
    def new(name: str, *shape: int) -> torch.Tensor:
        if workspace is None:
            return torch.empty(*shape, dtype=torch.float32, device=device)
        return workspace.get("terms_" + name, shape, device)

    rows = (batch, heads, tokens)
    return RowTerms(lse=new("lse", *rows), patch_mass=new("patch_mass", *rows),
                    patch_logit=new("patch_logit", *rows) if "patch_logit" in want else None,
                    dist_px=new("dist_px", *rows) if "dist" in want else None,
                    dist_grid=new("dist_grid", *rows) if "dist" in want else None,
                    prefix=new("prefix", *rows, num_prefix) if "prefix" in want and num_prefix else None)


def softmax_with_terms(logits: torch.Tensor, batch: slice, rows: slice, layout: TokenLayout,
                       workspace: Workspace, into: RowTerms, unnormalized: bool = False,
                       native: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write ``softmax(logits)`` (contiguous float32 ``[b, H, R, T]``: the query ``rows`` of the images
    ``batch``) to the workspace's ``probs`` buffer and its row terms to a layer's terms ``into``
    (:func:`layer_terms`).

    ``patch_mass`` and ``patch_logit`` sum over the keys after the layout's prefix tokens. On the
    PyTorch path masked keys (``z = -inf``, ``p = 0``) make ``patch_logit`` NaN, which the metrics
    read as "take the logits path"; the C kernel, like the GPU kernel, leaves keys with ``p = 0``
    out of it.

    Returns ``(probs, row_scale)``. With ``unnormalized`` (the caller reads the probabilities only
    to multiply them by V, and not the logits) the C kernel leaves each row as ``exp(z - max)``,
    written over the logits (one buffer less through the cache), and ``row_scale`` is the rows'
    ``1 / sum`` (``[b, H, R]``) to scale the product with, and the ``probs`` buffer is not touched;
    otherwise ``(probs, None)``. ``native=False``: PyTorch's chunks even where the C kernel built
    (what the conformance kit checks that path with).
    """
    kernel = native and cpu_kernel.available(logits)
    if kernel and unnormalized:
        inv = workspace.get("row_inv", logits.shape[:-1], logits.device)
        cpu_kernel.softmax_terms(logits, logits, batch, rows, layout, into, inv)
        return logits, inv
    probs = workspace.get("probs", logits.shape, logits.device)
    if kernel:
        cpu_kernel.softmax_terms(logits, probs, batch, rows, layout, into)
        return probs, None
    if into.dist_px is not None or into.prefix is not None:
        raise RuntimeError("distance and prefix terms come only from the C row kernel (terms_served decides)")
    num_prefix = layout.num_prefix
    t = logits.shape[-1]
    zf, pf = logits.view(-1, t), probs.view(-1, t)
    n = zf.shape[0]
    step = max(1, min(n, workspace.scratch_bytes // (4 * t)))  # a chunk's rows stay in the L2 cache
    mass = torch.empty(n, dtype=torch.float32, device=logits.device)
    dot = torch.empty(n, dtype=torch.float32, device=logits.device)
    buf = workspace.get("row_dot", (step, t), logits.device)
    for r in range(0, n, step):
        e = min(r + step, n)
        p = torch.ops.aten._softmax.out(zf[r:e], -1, False, out=pf[r:e])
        torch.sum(torch.mul(p, zf[r:e], out=buf[: e - r])[:, num_prefix:], -1, out=dot[r:e])
        torch.sum(p[:, num_prefix:], -1, out=mass[r:e])
    shape = logits.shape[:-1]
    into.lse[batch, :, rows] = log_partition(probs, logits)
    into.patch_mass[batch, :, rows] = mass.view(shape)
    if into.patch_logit is not None:
        into.patch_logit[batch, :, rows] = dot.view(shape)
    return probs, None
