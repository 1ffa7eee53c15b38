"""What a PyTorch model itself computes, read at its own function calls, for checks that must not
trust the adapter: the attention softmaxes (or SDPA calls), its norms' inputs and outputs in call
order, and any randomness (dropout) that runs.

A :class:`torch.overrides.TorchFunctionMode` sees every ``softmax`` and
``scaled_dot_product_attention`` call and every ``layer_norm``/``rms_norm`` call of a forward
pass, whatever module or hand-written code makes it (``nn.Softmax``, ``dots.softmax(-1)``, a
fused SDPA path). That gives any torch ViT a reference attention without a library
reference (the model's own softmax, computed from the same layer inputs as the tap's, since it
is the same forward), and the tensors a block's output must be (the input of the norm that feeds
the next attention). The same mode can replace one norm's input in a later, identical forward
(``perturb``): what changes downstream says which attention that norm feeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from probekit.masks import additive_bias

__all__ = ["ModelCalls"]

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
_NORMS = {F.layer_norm, torch.layer_norm, F.group_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
# dropout in every spelling: (input, p, training) positionally, as F.dropout and torch.dropout take them
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
            torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}
_RANDOM = {torch.bernoulli, torch.Tensor.bernoulli_, torch.rand, torch.rand_like, torch.randn, torch.randn_like,
           torch.randint, torch.randperm, torch.Tensor.uniform_, torch.Tensor.normal_, torch.multinomial, torch.normal}


def _arg(args, kwargs, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def sdpa_probs(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """float64 ``softmax(q k^T * scale + mask)`` exactly as SDPA defines its weights."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    logits = (q.double() @ k.double().transpose(-1, -2)) * s
    bias = additive_bias(attn_mask, true_means="attend", is_causal=is_causal, shape=logits.shape[-2:],
                         device=q.device)
    if bias is not None:
        logits = logits + bias.double()
    return torch.softmax(logits, -1)


class ModelCalls(TorchFunctionMode):
    """Within ``with``: the model's attention probabilities (``attention``, float32 ``[B, H, T, T]``
    in call order), its norms' ``(input, output)`` in call order (``norms``), and the random
    operations it ran (``randomness``: active dropout, random tensors).

    Args:
        attention: keep softmaxes over the last axis of square ``[B, H, T, T]`` tensors, and
            the weights of every SDPA call with as many queries as keys.
        norms: keep every normalization's input and output.
        perturb: ``{norm call index: f}``: that call normalises ``f(input)`` instead of its input
            (the model's own tensor, the residual stream, is left as it is). Indices count every
            norm call, recorded or not, so a forward that repeats a recorded one hits the same calls.
    """

    def __init__(self, attention: bool = True, norms: bool = False,
                 perturb: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None):
        super().__init__()
        self.want_attention, self.want_norms = attention, norms
        self.perturb = dict(perturb or {})
        self.attention: list[torch.Tensor] = []
        self.norms: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.norm_count = 0  # norm calls so far (the index of the next one)
        self.randomness: list[str] = []
        self._paused = False

    @contextlib.contextmanager
    def paused(self):
        """Calls made meanwhile are not recorded (a sink's own softmax is not the model's)."""
        prev, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = prev

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        if func in _NORMS:
            index, self.norm_count = self.norm_count, self.norm_count + 1
            if index in self.perturb:
                args = (self.perturb[index](args[0]), *args[1:])
        out = func(*args, **kwargs)
        self._note_randomness(func, args, kwargs)
        if self.want_attention and func in _SOFTMAX:
            x, dim = args[0], _arg(args, kwargs, 1, "dim")
            if x.dim() == 4 and x.shape[-1] == x.shape[-2] and dim in (-1, 3):
                self.attention.append(out.detach().float().clone())
        elif self.want_attention and func is F.scaled_dot_product_attention:
            q, k = args[0], _arg(args, kwargs, 1, "key")
            if q.dim() == 4 and q.shape[-2] == k.shape[-2]:
                probs = sdpa_probs(q.detach(), k.detach(), _arg(args, kwargs, 3, "attn_mask"),
                                   _arg(args, kwargs, 5, "is_causal", False), kwargs.get("scale"),
                                   kwargs.get("enable_gqa", False))
                self.attention.append(probs.float())
        elif self.want_norms and func in _NORMS and isinstance(out, torch.Tensor):
            self.norms.append((args[0].detach().clone(), out.detach().clone()))
        return out

    def _note_randomness(self, func, args, kwargs) -> None:
        if func in _DROPOUT:
            p = _arg(args, kwargs, 1, "p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))  # torch.*: train
            if training and p:
                self.randomness.append(f"{_name(func)}(p={p:g}, training=True)")
        elif func is F.scaled_dot_product_attention and _arg(args, kwargs, 4, "dropout_p", 0.0):
            self.randomness.append(f"scaled_dot_product_attention(dropout_p={_arg(args, kwargs, 4, 'dropout_p'):g})")
        elif func in _RANDOM:
            self.randomness.append(_name(func))


def _name(func) -> str:
    module = getattr(func, "__module__", None) or ""
    short = {"torch.nn.functional": "F.", "torch": "torch."}.get(module, "")
    return short + getattr(func, "__name__", str(func))
