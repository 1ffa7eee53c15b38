"""Attention entropy: how spread out each head's attention over the patches is."""

from __future__ import annotations

import math

import torch

from probekit.attention import row_dot
from probekit.metric import Metric
from probekit.metric.patch_keys import log_partition, patch_entropy, patch_mass_is_safe, row_entropy, visible_rows
from probekit.tokens import TokenLayout


class AttentionEntropy(Metric):
    """Shannon entropy of each head's attention over patch keys, averaged over query patches.

    For a query patch ``q`` with attention ``A[q, k]`` renormalized over the ``N`` patch keys
    (prefix tokens dropped from queries and keys)::

        H_q = - sum_k A[q, k] ln A[q, k]            (nats; 0 for one key, ln N for uniform)

    then the mean over query patches. Low entropy means a head attends to few patches; the
    entropy of attention is used to diagnose attention collapse and to compare heads (e.g.
    Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
    Collapse"; Walmer et al. 2023 use the same per-head spread with MAD).

    Args:
        normalized: divide by ``ln N`` so values lie in ``[0, 1]`` whatever the grid size.

    Returns:
        ``[B, H]`` per image and head.

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=1, grid=(14, 14), patch_size=(16, 16))
    >>> uniform = torch.full((1, 1, 197, 197), 1 / 197)
    >>> round(AttentionEntropy().compute(uniform, lay).item(), 3)
    5.278
    """

    name = "entropy"
    display_name = "attention entropy"
    requires = ()  # windowed layers: the entropy over the patch keys each query sees
    uses_logits = True  # the renormalized rows are the softmax of the patch-key logits (no underflow)
    kernel_terms = frozenset({"lse", "patch_mass", "patch_logit"})
    description = "entropy of attention over patch keys (nats; rows renormalized), mean over query patches"
    citation = "Zhai et al. 2023, Stabilizing Transformer Training by Preventing Attention Entropy Collapse"
    unit = "nats"

    normalized: bool = False

    def value_unit(self) -> str:
        return "fraction of ln N" if self.normalized else "nats"

    def reference_value(self, layout: TokenLayout) -> float:
        """Entropy of uniform attention over the patch keys: ``ln N`` (1 when normalized), the maximum."""
        return 1.0 if self.normalized else math.log(layout.num_patches)

    def row_values(self, probs: torch.Tensor, layout: TokenLayout, rows: slice, logits=None) -> torch.Tensor:
        """``H_q`` per query row; from the patch-key logits when the engine hands them over.

        The renormalized row is the softmax of the patch-key logits alone, so the entropy is
        exact however much mass the head puts on prefix tokens (:func:`~probekit.metric.patch_keys.patch_entropy`);
        from probabilities alone (ONNX taps) the patch mass is divided out, which fails once it
        underflows float32.
        """
        h = patch_entropy(probs, layout, logits)
        if self.normalized:
            h = h / max(math.log(layout.num_patches), torch.finfo(h.dtype).tiny)
        return h

    def window_sum(self, probs: torch.Tensor, geometry, groups: torch.Tensor, **kw) -> torch.Tensor:
        """Windowed/pooled layers: ``H_q`` over the patch keys each query sees (normalized: by the ln
        of their count, per query), summed over each group's queries."""
        keys = geometry.visible_patch_keys(probs.device)[groups][:, None]
        h = row_entropy(visible_rows(probs, keys, kw.get("logits")))  # from the logits where the tap has them
        if self.normalized:
            h = h / keys.sum(-1).log().clamp_min(torch.finfo(h.dtype).tiny)
        return (h * geometry.query_mask().to(probs.device, h.dtype)[groups][:, None]).sum(-1)

    def row_sum(self, probs: torch.Tensor, layout: TokenLayout, rows: slice, logits=None) -> torch.Tensor:
        """Sum over the block's rows of ``H_q``, from the logits when the engine hands them over.

        With ``p = softmax(z)`` over all keys and ``s`` the mass on patch keys, the renormalized
        row ``a = p / s`` has ``ln a = z - lse - ln s``, so ``H = lse + ln s - <p, z>_patch / s``,
        where ``lse = z_k - ln p_k`` for any key ``k`` (a softmax identity:
        :func:`~probekit.metric.patch_keys.log_partition`). One dot product per row instead of a
        logarithm per element; within 1e-6 of float64 on sharp heads. The engine makes the same
        sums next to the softmax (:mod:`probekit.engine.kernels.block_terms`, through :meth:`kernel_row_sum`);
        this is the path for callers that hand over finished blocks. Masked keys
        (``z = -inf``) make the dot product undefined, and a head that parks nearly all its mass
        on prefix tokens underflows the patch probabilities: those blocks take the softmax of
        the patch-key logits (:func:`~probekit.metric.patch_keys.patch_entropy`), exact at any gap.
        """
        if logits is None:
            return super().row_sum(probs, layout, rows)
        n0 = layout.num_prefix
        pz = row_dot(probs, logits, n0)
        h = self._from_sums(log_partition(probs, logits), probs[..., n0:].sum(-1), pz, layout)
        if h is None:  # masked keys, or patch probabilities underflowed: the patch-key softmax
            return super().row_sum(probs, layout, rows, logits)
        return h.sum(-1)

    def kernel_row_sum(self, terms, layout: TokenLayout, rows: slice) -> torch.Tensor | None:
        """The same identity from the kernel's per-row ``lse``, patch mass and ``<p, z>_patch``."""
        h = self._from_sums(terms.lse[..., rows], terms.patch_mass[..., rows], terms.patch_logit[..., rows], layout)
        return None if h is None else h.sum(-1)

    def _from_sums(self, lse, mass, pz, layout: TokenLayout) -> torch.Tensor | None:
        """``H = lse + ln s - <p, z>_patch / s`` per row; None where not finite (masked keys) or where
        the patch mass ``s`` is too small for the patch probabilities to have survived float32."""
        tiny = torch.finfo(mass.dtype).tiny
        if not patch_mass_is_safe(mass):
            return None
        h = lse + mass.clamp_min(tiny).log() - pz / mass.clamp_min(tiny)
        if not bool(torch.isfinite(h).all()):
            return None
        h = torch.where(mass > 0, h, torch.zeros_like(h)).clamp_min(0)
        if self.normalized:
            h = h / max(math.log(layout.num_patches), tiny)
        return h
