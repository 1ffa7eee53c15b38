"""The per-row sums of a block of probabilities that metrics share, made while the softmax writes it.

Why: entropy over the patch keys needs, per query row, ``lse``, the patch mass ``sum_patch p``
and ``<p, z>_patch`` (``H = lse + ln s - <p, z>_patch / s``). Read from the finished block,
those sums cost two more passes over its multi-MB logits and probabilities; made chunk by chunk
right after the softmax has written each chunk of rows, they read it from the L2 cache (on
this project's CPU, a [2, 6, 255, 1370] block: softmax and sums 4.7 ms instead of 5.4 ms one
after the other; the softmax alone takes 2.6 ms).

The sums are the fused GPU kernel's :class:`~probekit.kernel.RowTerms`, for the rows of one
block: a metric whose ``kernel_terms`` lie within :data:`BLOCK_TERMS` is served through the
same :meth:`~probekit.Metric.kernel_row_sum` on the blocked path as on the kernel (and falls back
to its ``row_sum`` where that returns None, e.g. a patch mass that underflowed float32).
"""

from __future__ import annotations

import torch

from .attention import Workspace
from .kernel import RowTerms
from .patch_keys import log_partition

__all__ = ["BLOCK_TERMS", "softmax_with_terms"]

#: Terms the blocked path makes next to the softmax.
BLOCK_TERMS = frozenset({"lse", "patch_mass", "patch_logit"})

def softmax_with_terms(logits: torch.Tensor, probs: torch.Tensor, num_prefix: int, workspace: Workspace) -> RowTerms:
    """Write ``softmax(logits)`` to ``probs`` (both contiguous float32 ``[B, H, R, T]``) and return its row terms.

    ``patch_mass`` and ``patch_logit`` sum over the keys from ``num_prefix`` on; all terms are
    ``[B, H, R]``. Masked keys (``z = -inf``, ``p = 0``) make ``patch_logit`` NaN, which the
    metrics read as "take the logits path".
    """
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
    return RowTerms(lse=log_partition(probs, logits), patch_mass=mass.view(shape), patch_logit=dot.view(shape))
