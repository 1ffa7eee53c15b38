"""The attention a tap is compared with, and the words for how it differs: the library's reference
(``Adapter.reference_attention``) or else the model's own softmax/SDPA calls in the same forward;
a layer index shifted by one, a temperature (a wrong softmax scale), and a model whose prefix
tokens come after the patches (which the tap must move to the front, as the layout orders them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from probekit.adapter import Adapter
from probekit.testing.capture import ModelCalls
from probekit.testing.records import SkipCheck
from probekit.testing.tapping import tapped
from probekit.tokens import prefix_first

__all__ = ["tap_and_reference", "deviation", "prefix_last_reference", "shift_hint", "scale_hint"]


def _model_softmax_reference(name: str, ad: Adapter, x: torch.Tensor):
    """``(tap's sink, reference)``: the tap and the model's own softmax/SDPA calls, in one forward."""
    calls = ModelCalls(attention=True)
    with calls:
        sink = tapped(ad, x, calls=calls)[0]
    if len(calls.attention) != ad.num_layers:
        raise SkipCheck(
            f"{name}: no reference_attention, and the model's own attention could not be read: one forward made "
            f"{len(calls.attention)} softmax/SDPA calls over square [B, H, T, T] tensors for {ad.num_layers} "
            "layers. Implement reference_attention (the library's own attention probabilities)."
        )
    return sink, dict(enumerate(calls.attention))


@torch.inference_mode()
def tap_and_reference(name: str, ad: Adapter, x: torch.Tensor, reference: Callable | None = None):
    """``(tap's sink, {layer: reference probabilities}, words for the source)`` for input ``x``."""
    try:
        ref = (reference or ad.reference_attention)(x)
        return tapped(ad, x)[0], ref, "reference"
    except NotImplementedError:
        sink, ref = _model_softmax_reference(name, ad, x)
        return sink, ref, "the model's own softmax"


def deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference; infinite where the shapes differ."""
    if got.shape != want.shape:
        return float("inf")
    return (got.float().cpu() - want.float().cpu()).abs().max().item()


def prefix_last_reference(ref: dict[int, torch.Tensor], num_prefix: int) -> dict[int, torch.Tensor] | None:
    """``ref`` with its last ``num_prefix`` tokens moved to the front of every row and column: a model
    that appends its prefix tokens (a class token last) as the layout orders them; None if not square."""
    if not num_prefix or any(p.shape[-1] != p.shape[-2] for p in ref.values()):
        return None
    return {i: prefix_first(prefix_first(p, num_prefix, -1), num_prefix, -2) for i, p in ref.items()}


def shift_hint(got: dict[int, torch.Tensor], ref: dict[int, torch.Tensor], allowed: dict[int, float]) -> str:
    """Words for taps whose layer ``l`` is the reference's ``l + 1`` (or ``l - 1``) at every layer
    that has one: the layer index is off by one (a loop that starts at 1, ``layers[i - 1]``)."""
    for step in (1, -1):
        pairs = [(i, i + step) for i in sorted(got) if i + step in ref]
        if pairs and all(deviation(got[i], ref[j]) <= allowed.get(i, 0.0) for i, j in pairs):
            i, j = pairs[0]
            more = f", and so on for all {len(pairs)} layers that have one" if len(pairs) > 1 else ""
            return (f": layer index off by one: your layer {i} matches the reference's {j}{more}; number the layers "
                    "as the model runs them, from 0")
    return ""


def scale_hint(got: torch.Tensor, want: torch.Tensor) -> str:
    """Words for a deviation that is a temperature: tapped logits a constant times the reference's."""
    if got.shape != want.shape:
        return ""
    got, want = got.cpu(), want.cpu()
    tiny = torch.finfo(torch.float32).tiny * 1e8
    lg, lw = got.double().clamp_min(tiny).log(), want.double().clamp_min(tiny).log()
    keep = (got > 1e-12) & (want > 1e-12)
    lg, lw = [torch.where(keep, v - (v * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True), 0) for v in (lg, lw)]
    slope = ((lg * lw).sum() / (lw * lw).sum().clamp_min(1e-30)).item()
    corr = ((lg * lw).sum() / ((lg * lg).sum() * (lw * lw).sum()).sqrt().clamp_min(1e-30)).item()
    if corr > 0.999 and abs(slope - 1) > 0.02:
        return (f": the tapped logits are {slope:.3g}x the reference's, a wrong or missing softmax scale "
                "(usually head_dim ** -0.5)")
    return ""
