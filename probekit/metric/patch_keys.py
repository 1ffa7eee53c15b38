"""Each query's attention over the patch keys alone, renormalized: from the logits, stably.

Metrics that drop prefix tokens (CLS, registers) from the keys rescale each row to sum to 1
over the patch keys. Doing so after a softmax over all keys fails when a head puts almost all
its mass on prefix tokens (attention sinks): the patch-key probabilities underflow float32
(below ~1e-38 they are 0; well before that they lose their digits), and the renormalized row
is garbage, e.g. entropies above ln N. The renormalized row is exactly the softmax of the
patch-key logits alone, ``p_k / sum_patch p = softmax(z_patch)_k``, which is stable at any
gap between prefix and patch logits: the engine hands blocks their logits wherever it has them
(``block.logits``).

Where only probabilities exist (a tap that hands over probabilities, e.g. ONNX graphs, or
:meth:`~probekit.Metric.compute` called on probabilities), the fallback divides by the patch
mass; it is exact while that mass is a normal float32 number with digits to spare, and a row
whose patch mass is 0 stays all-zero (entropy 0) instead of dividing by zero. Such taps
cannot do better: once the patch probabilities have underflowed, nothing recovers them.
"""

from __future__ import annotations

import torch

from probekit.tokens import TokenLayout

__all__ = ["patch_rows", "visible_rows", "patch_entropy", "row_entropy", "patch_mass_is_safe", "SAFE_PATCH_MASS",
           "log_partition"]

#: Patch mass (of a softmax over all keys, float32) above which dividing it out is safe: a patch
#: key lost to underflow (p < 1e-38) then weighs under 1e-23 in the renormalized row. Below it,
#: fast paths that renormalize probabilities (the identity entropy, the fused kernel's sums) must
#: defer to the patch-key logits.
SAFE_PATCH_MASS = 1e-15


def patch_mass_is_safe(mass: torch.Tensor) -> bool:
    """Whether every row's patch mass ``[...]`` is at least :data:`SAFE_PATCH_MASS` (one host sync)."""
    return bool((mass >= SAFE_PATCH_MASS).all())


def log_partition(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``lse = log sum_k exp(z_k)`` of each row from its softmax output: ``[..., T]`` -> ``[...]``.

    ``p_k = exp(z_k - lse)`` for every key, so ``lse = z_k - ln p_k`` for any one key: read at the
    first key, a gather instead of two passes over the row (``max z - ln max p``). That is exact
    to float32 rounding while the first key's probability is a normal number with digits to spare
    (:data:`SAFE_PATCH_MASS`); rows where it is not (a masked first key, or a head that gives it
    almost nothing) take the maximum, where ``p`` is largest (one host sync per call).
    """
    p0 = probs[..., 0]
    if bool((p0 >= SAFE_PATCH_MASS).all()):
        return logits[..., 0] - p0.log()
    return logits.amax(-1) - probs.amax(-1).log()


def patch_rows(probs: torch.Tensor, layout: TokenLayout, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[..., T]`` over the patch keys only, renormalized to sum to 1: ``[..., N]``.

    From ``logits`` (same shape as ``probs``) when given: ``softmax(logits[..., patches])``.
    Rows whose patch keys are all masked (``-inf``), or whose patch mass is 0, are all-zero.

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(1, 2), patch_size=(16, 16))
    >>> z = torch.tensor([[200.0, 1.0, 0.0]])       # CLS takes all the float32 mass
    >>> patch_rows(torch.softmax(z, -1), lay).tolist()    # from probabilities: nothing left
    [[0.0, 0.0]]
    >>> [round(v, 4) for v in patch_rows(torch.softmax(z, -1), lay, z)[0].tolist()]   # from logits
    [0.7311, 0.2689]
    """
    n0 = layout.num_prefix
    if logits is not None:
        return torch.softmax(logits[..., n0:], dim=-1).nan_to_num(0.0)
    a = probs[..., n0:]
    return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def visible_rows(probs: torch.Tensor, keys: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[..., Tk]`` renormalized over the keys where ``keys`` (0/1, broadcastable) is set.

    :func:`patch_rows` for layers whose patch keys are not one slice (windows, pooled keys: the
    patch keys each query sees, :mod:`probekit.geometry`); from ``logits`` the same way, as the
    softmax of the visible keys' logits alone. Rows that see no key are all-zero.
    """
    if logits is not None:
        z = logits.masked_fill(keys == 0, float("-inf"))
        return torch.softmax(z, dim=-1).nan_to_num(0.0)
    a = probs * keys
    return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def row_entropy(a: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of ``a`` ``[..., N]`` (``0 ln 0 = 0``)."""
    return -torch.special.xlogy(a, a).sum(-1)


def patch_entropy(probs: torch.Tensor, layout: TokenLayout, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of each row renormalized over the patch keys: ``[..., T]`` -> ``[...]``.

    From ``logits``: ``H = -sum_k a_k ln a_k`` with ``ln a = z - logsumexp(z)`` over the patch
    logits ``z``, so neither ``a`` nor its logarithm ever passes through the all-key softmax.
    """
    if logits is None:
        return row_entropy(patch_rows(probs, layout))
    z = logits[..., layout.num_prefix :]
    log_a = z - torch.logsumexp(z, dim=-1, keepdim=True)
    a = log_a.exp()
    return -torch.where(a > 0, a * log_a, torch.zeros((), dtype=a.dtype, device=a.device)).sum(-1)
