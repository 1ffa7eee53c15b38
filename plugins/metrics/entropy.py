"""Attention entropy: how spread out each head's attention over the patches is."""

from __future__ import annotations

import math

import torch

from probekit.attention import row_dot
from probekit.metric import Block, Metric
from probekit.metric.patch_keys import log_partition, patch_entropy, patch_mass_is_safe, row_entropy
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
    kernel_terms = frozenset({"lse", "patch_mass", "patch_logit"})
    description = "entropy of attention over patch keys (nats; rows renormalized), mean over query patches"
    citation = "Zhai et al. 2023, Stabilizing Transformer Training by Preventing Attention Entropy Collapse"

    normalized: bool = False
    unit = property(lambda self: "fraction of ln N" if self.normalized else "nats")

    def reference_value(self, layer) -> float | None:
        """Entropy of uniform attention over the patch keys: ``ln N`` (1 when normalized), the maximum."""
        if not isinstance(layer, TokenLayout):
            return None
        return 1.0 if self.normalized else math.log(layer.num_patches)

    def row_values(self, block: Block) -> torch.Tensor | None:
        """``H_q`` per query row, over the patch keys, from the cheapest exact form the block allows.

        With ``p = softmax(z)`` over all keys and ``s`` the mass on patch keys, the renormalized
        row ``a = p / s`` has ``ln a = z - lse - ln s``, so ``H = lse + ln s - <p, z>_patch / s``:
        one dot product per row instead of a logarithm per element, within 1e-6 of float64 on
        sharp heads. The kernels make those three sums next to the softmax (``block.terms``); from
        a block's probabilities and logits they cost one pass (:func:`~probekit.attention.row_dot`;
        ``lse`` by :func:`~probekit.metric.patch_keys.log_partition`). Where that identity is not
        safe (masked keys make the dot product undefined; a head that parks nearly all its mass on
        prefix tokens underflows the patch probabilities) the entropy of the softmax of the
        patch-key logits (:func:`~probekit.metric.patch_keys.patch_entropy`), exact at any gap;
        from probabilities alone (ONNX taps) the patch mass is divided out, exact while it has
        digits to spare. Windowed and pooled layers: the patch keys each query sees, normalized by
        the ln of their count.
        """
        if block.terms is not None:
            t = block.terms
            return self._from_sums(t.lse, t.patch_mass, t.patch_logit, block.layout)
        probs, logits = block.probs, block.logits
        assert probs is not None
        if block.geometry is not None:
            keys = block.geometry.visible_patch_keys(probs.device)[block.groups][:, None]
            h = row_entropy(block.patch_rows(renormalize=True))
            return h / keys.sum(-1).log().clamp_min(torch.finfo(h.dtype).tiny) if self.normalized else h
        layout = block.layout
        assert layout is not None
        if logits is not None:
            n0 = layout.num_prefix
            fast = self._from_sums(log_partition(probs, logits), probs[..., n0:].sum(-1), row_dot(probs, logits, n0),
                                   layout)
            if fast is not None:
                return fast
        h = patch_entropy(probs, layout, logits)
        return h / max(math.log(layout.num_patches), torch.finfo(h.dtype).tiny) if self.normalized else h

    def _from_sums(self, lse, mass, pz, layout: TokenLayout | None) -> torch.Tensor | None:
        """``H = lse + ln s - <p, z>_patch / s`` per row; None where not finite (masked keys) or where
        the patch mass ``s`` is too small for the patch probabilities to have survived float32."""
        assert layout is not None and pz is not None
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
