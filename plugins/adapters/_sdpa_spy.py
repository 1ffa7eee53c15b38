"""The SDPA spy: how the timm and open_clip taps see what a fused attention's softmax sees.

timm (and open_clip's timm towers) fix ``fused_attn`` at build time and, when fused, never call
the modules a hook could watch. Every fused path calls ``F.scaled_dot_product_attention``, so
while a watched attention module runs, a thread-local spy on that function hands the sink q and
k (after q/k-norm and rotary embedding), v, the scale and the mask or relative-position bias as
an additive bias; when the sink produced the layer's output from its probability blocks (one
attention pass, :func:`probekit.engine.kernels.policy.one_pass`) the spy returns that, otherwise it lets
the original kernel run. An unfused module's ``attn_drop`` input
is the probabilities themselves; :func:`watch_attention` passes those on instead. Calls made
outside a watched module pass straight through. :func:`tap_blocks` puts these hooks (and the
hidden-state hooks) on the blocks of a tower: both adapters' taps are that one loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from probekit.adapter import Sink, wants
from probekit.attention import LayerAttention, sdpa_dtype
from probekit.errors import UnsupportedArchitectureError
from probekit.masks import additive_bias

__all__ = ["watch_sdpa", "attention_report", "watch_attention", "tap_blocks"]

#: ``(q=, k=, v=, scale=, bias=, probs=) -> the layer's output or None`` (see :func:`attention_report`)
Report = Callable[..., "torch.Tensor | None"]


class _Pending(threading.local):
    """Per thread: the report function of the watched attention module now running, if any."""

    report: Report | None = None


_PENDING = _Pending()
_SPY_LOCK = threading.Lock()
_SPY_USERS = 0
_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _sdpa_spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    report = _PENDING.report
    if report is not None:
        _PENDING.report = None  # one report per watched call, and none from inside the sink
        # no mask and not causal (a ViT's layers): no bias, as additive_bias would say, without its call
        bias = None if attn_mask is None and not is_causal else additive_bias(
            attn_mask, true_means="attend", is_causal=is_causal, shape=(query.shape[-2], key.shape[-2]),
            device=query.device)
        plain = dropout_p == 0 and (not kw or set(kw) <= {"enable_gqa"})
        out = report(q=query, k=key, v=value if plain else None, scale=scale, bias=bias)
        if out is not None:
            return out
    return _ORIGINAL_SDPA(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw
    )


@contextmanager
def watch_sdpa() -> Iterator[None]:
    """Install the SDPA spy for the duration (reference counted; inert outside watched modules)."""
    global _SPY_USERS
    with _SPY_LOCK:
        if _SPY_USERS == 0:
            # the spy takes each torch version's SDPA keywords through **kw, so its signature is not torch's
            F.scaled_dot_product_attention = _sdpa_spy  # type: ignore[assignment]  # see above
        _SPY_USERS += 1
    try:
        yield
    finally:
        _PENDING.report = None  # an attention that raised before its SDPA call must not stay armed
        with _SPY_LOCK:
            _SPY_USERS -= 1
            if _SPY_USERS == 0:
                F.scaled_dot_product_attention = _ORIGINAL_SDPA


def attention_report(sink: Sink, layer: int) -> Report:
    """A function that turns what the spy (or ``attn_drop``) saw into ``sink.attention(layer, ...)``.

    It returns the layer's attention output ``[B, H, T, dv]`` when the sink produced it from
    ``v`` (one attention pass), else None (the caller runs its own kernel).
    """

    def report(q=None, k=None, v=None, scale=None, bias=None, probs=None) -> torch.Tensor | None:
        if probs is not None:
            sink.attention(layer, LayerAttention(probs_given=probs))
            return None
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each k (and v) head
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = None if v is None else v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        s = float(scale) if scale is not None else q.shape[-1] ** -0.5
        return sink.attention(layer, LayerAttention(q=q, k=k, scale=s, bias=bias, v=v, out_dtype=sdpa_dtype(q)))

    return report


def watch_attention(attn: nn.Module, report: Report, where: str, drop: str = "attn_drop",
                    weights_out: bool = False) -> list:
    """Hooks on one attention module: arm the spy on entry, read its dropout module ``drop`` when
    unfused (or, with ``weights_out``, the probabilities the module returns second, as eager
    transformers modules do), and fail loudly on exit if no path reported (an attention we do not
    understand)."""

    def arm(module, args):
        _PENDING.report = report

    def unfused(module, args, out):
        if _PENDING.report is report:
            _PENDING.report = None
            report(probs=args[0])  # the dropout's input: the probabilities even in training mode

    def check(module, args, out):
        if _PENDING.report is report:
            _PENDING.report = None
            if weights_out and isinstance(out, tuple) and len(out) > 1 and torch.is_tensor(out[1]):
                report(probs=out[1])
                return
            raise UnsupportedArchitectureError(
                f"{where} ({type(attn).__name__}) computed its attention without "
                "F.scaled_dot_product_attention or an attn_drop module, so probekit cannot tap it. "
                "Report the model name; a family entry in plugins/adapters/timm.py may be needed."
            )

    handles = [attn.register_forward_pre_hook(arm), attn.register_forward_hook(check)]
    # a timm module built fused (``fused_attn``, fixed at build time) runs SDPA and never calls its dropout
    # module (it reads only its ``p``): no hook there, a third fewer hooks to put on and take off per call
    dropout = None if getattr(attn, "fused_attn", None) is True else getattr(attn, drop, None)
    if isinstance(dropout, nn.Module):
        handles.append(dropout.register_forward_hook(unfused))
    return handles


def _hidden_hook(sink, layer: int):
    """A forward hook that hands a block's output to ``sink.hidden(layer, ...)``."""

    def hook(module, args, out):
        sink.hidden(layer, out)

    return hook


def _watch_block_attention(attn: nn.Module, sink: Sink, layer: int) -> list:
    return watch_attention(attn, attention_report(sink, layer), f"layer {layer}")


@contextmanager
def tap_blocks(blocks: list[nn.Module], sink: Sink, watch: Callable[[nn.Module, Sink, int], list] | None = None,
               hidden=None, hidden_hook: Callable[[int], Callable] | None = None) -> Iterator[None]:
    """The SDPA spy installed and hooks on each block ``sink`` wants, for the duration.

    Args:
        blocks: transformer blocks in order, each with its attention module at ``.attn``.
        sink: the tap's sink (``wants_attention``, ``wants_hidden``, wanted layers).
        watch: ``(attention module, sink, layer) -> hook handles`` (default: the spy through
            :func:`watch_attention`); a tower with other attention modules passes its own.
        hidden: where block outputs go (an object with ``hidden(layer, tokens)``; default ``sink``),
            e.g. a wrapper that turns tokens-first outputs batch-first.
        hidden_hook: ``layer -> forward hook`` for that layer's block, when its output needs more than
            ``hidden`` (the block's inputs, its own layout: staged timm models); default: the output to ``hidden``.
    """
    watch = watch or _watch_block_attention
    hidden = sink if hidden is None else hidden
    handles = []
    try:
        with watch_sdpa():
            for i, block in enumerate(blocks):
                if not wants(sink, i):
                    continue
                if sink.wants_attention:
                    handles += watch(cast(nn.Module, block.attn), sink, i)  # the block's attention module
                if sink.wants_hidden:
                    hook = _hidden_hook(hidden, i) if hidden_hook is None else hidden_hook(i)
                    handles.append(block.register_forward_hook(hook))
            yield
    finally:
        for h in handles:
            h.remove()
