"""The hidden-state check: each layer's hidden state must be exactly what the next layer's attention
reads, token for token in that attention's order (the layout's), proven on the model itself.

Why perturbation. A block's output, the residual stream, is the input of the norm in front of the
next attention (pre-norm blocks; post-norm blocks: that norm's output). But the model calls many
norms (the MLP's, the patch embedding's, the final one), and a hidden state taken one block early
(the block's input) or halfway through a block (before the MLP) is the input of one of them too.
Which norm feeds layer l + 1's attention is therefore found, not assumed: in a forward identical to
a recorded one, the input of one norm call is replaced by a perturbed copy (the residual stream is
left alone), and the tap's attention says what moved. The norm that feeds layer l + 1 is the latest
call whose perturbation moves layer l + 1's attention and no attention before it: a norm called
after that attention cannot move it, and the MLP's norm, which moves it too, comes earlier. Then:

- identity: layer l's hidden state equals that norm's input (post-norm: its output), up to the
  order of its tokens;
- order: perturbing that input at the model token behind hidden token j alone must move token j's
  row and column of layer l + 1's attention, whose order ``check_patch_geometry`` pins to the
  layout (and ``check_reference_attention`` to the model's softmax).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from probekit.testing.capture import ModelCalls
from probekit.testing.geometry import moved
from probekit.testing.records import SkipCheck
from probekit.testing.tapping import _KitSink, adapter_of, kit_input, tapped

__all__ = ["check_hidden_is_block_output"]

RTOL = 1e-5  # a copy of a tensor agrees exactly; float32 recomputations of it to ~1e-7 of its scale
MOVES = 1e-5  # a log-probability that changes this much moved (an untouched layer does not change at all; the
# perturbations below move peaked heads' logits by ~1, near-uniform ones' at random init by ~1e-3)


def _as_tokens(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(t as like's [B, T, D], t's token dim)``: as it is, tokens first (``[T, B, D]``) or a
    grid (``[B, h, w, D]``, token dim None: -1); None where ``t`` cannot hold ``like``'s tokens."""
    if t.shape == like.shape:
        return t, 1
    if t.dim() == 3 and t.transpose(0, 1).shape == like.shape:
        return t.transpose(0, 1), 0
    if t.dim() > 3 and t.shape[0] == like.shape[0] and t.shape[-1] == like.shape[-1] and t.numel() == like.numel():
        return t.reshape(like.shape), -1
    return None


def _order(h: torch.Tensor, t: torch.Tensor) -> list[int] | None:
    """The token of ``t`` behind each token of ``h`` (first image), or None where ``h`` is not
    ``t``'s tokens in some order."""
    fit = _as_tokens(t, h)
    if fit is None:
        return None
    h0, t0 = h[0].double().cpu(), fit[0][0].double().cpu()
    scale = t0.abs().max().clamp_min(1e-12)
    if ((h0 - t0).abs().max() / scale).item() <= RTOL:
        return list(range(len(h0)))
    near = torch.cdist(h0, t0).argmin(-1)
    if ((h0 - t0[near]).abs().max() / scale).item() > RTOL or len(set(near.tolist())) != len(near):
        return None
    return near.tolist()


def _noise(seed: int, token: int | None = None, dim: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> t + noise`` of ``t``'s own spread, on every token or on ``token`` along ``dim`` only."""

    def perturb(t: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(t.shape, generator=g).to(t.device, t.dtype) * t.float().std().item()
        if token is not None:
            keep = torch.zeros(t.shape[dim], dtype=t.dtype, device=t.device)
            keep[token] = 1
            noise = noise * keep.view([-1 if d == dim else 1 for d in range(t.dim())])
        return t + noise

    return perturb


class _Sink(_KitSink):
    """The kit's sink, keeping each layer's q and k too where the tap hands them over."""

    def __init__(self, calls: ModelCalls):
        super().__init__(calls, None, attention=True, hidden=True)
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attention(self, layer, attn):
        super().attention(layer, attn)
        if attn.q is not None and attn.k is not None:
            with self._calls.paused() if self._calls else contextlib.nullcontext():
                self.qk[layer] = (attn.q.detach().clone(), attn.k.detach().clone())


def _run(ad, x: torch.Tensor, record: bool = False, perturb: dict | None = None) -> tuple[_Sink, ModelCalls]:
    """``(sink, calls)`` of one forward under a tap that reports attention and hidden states."""
    calls = ModelCalls(attention=False, norms=record, perturb=perturb)
    with calls:
        sink = tapped(ad, x, calls=calls, sink=_Sink(calls))[0]
    return sink, calls


def _first_moved(base: dict[int, torch.Tensor], probs: dict[int, torch.Tensor]) -> int | None:
    """The first layer whose attention changed (its log-probabilities, where probabilities of a
    near-uniform head hardly move)."""
    tiny = torch.finfo(torch.float32).tiny * 1e8
    for i in sorted(base):
        got = probs.get(i)
        if got is None or got.shape != base[i].shape:
            return i
        if (got.double().clamp_min(tiny).log() - base[i].double().clamp_min(tiny).log()).abs().max().item() > MOVES:
            return i
    return None


def _feeding_norm(ad, x, sink, calls, layer: int) -> int | None:
    """The index of the norm call whose input ``layer``'s attention reads (see the module docstring)."""
    h = next(iter(sink.hiddens.values()))
    fits = [i for i, (t, _) in enumerate(calls.norms) if _as_tokens(t, h) is not None]
    for n in reversed([i for i in fits if i < sink.reported_at.get(layer, len(calls.norms))]):
        first = _first_moved(sink.probs, _run(ad, x, perturb={n: _noise(11)})[0].probs)
        if first == layer:
            return n
        if first is not None and first < layer:
            return None  # scanned past it: this norm and every earlier one feed an earlier attention
    return None


def _what_it_is(layer: int, h: torch.Tensor, norms: list, feeds: dict[int, int | None]) -> str:
    """Words for a hidden state that is not what the next attention reads: which tensor it is."""
    reads = [i for i, (t, _) in enumerate(norms) if _order(h, t) is not None]
    said = (f"the hidden state of layer {layer} is not what layer {layer + 1}'s attention reads (the input of "
            f"the norm in front of it)")
    lo, hi = feeds.get(layer), feeds.get(layer + 1)
    if lo is not None and lo in reads:
        return (f"{said}: it is block {layer}'s input (what layer {layer}'s own attention reads), one block "
                f"behind: hand over the block's output, the residual stream after its MLP.")
    if feeds.get(layer + 2) is not None and feeds[layer + 2] in reads:
        return (f"{said}: it is what layer {layer + 2}'s attention reads: layer index off by one: your layer "
                f"{layer} is the model's layer {layer + 1}.")
    if lo is not None and hi is not None and any(lo < i < hi for i in reads):
        return (f"{said}: it is the input of a norm between layer {layer}'s attention and layer {layer + 1}'s "
                f"(the MLP's): taken halfway through block {layer}, the MLP half is missing; hand over x + "
                "attention + MLP.")
    if reads:
        return f"{said}: it is what another norm of the model reads (norm call {reads[0]}), not the block's output."
    return (f"{said}, nor what any norm of the model reads: report the residual stream (x + attention + MLP), "
            "not a branch such as the MLP output alone.")


def _moved_tokens(before: _Sink, after: _Sink, layer: int) -> list[int]:
    """The tokens of ``layer``'s attention that a perturbation moved: where q or k changed (exact, when
    the tap hands them over), else the rows and columns of the probabilities (:func:`moved`)."""
    if layer in before.qk and layer in after.qk:
        changed = [(a - b).abs().flatten(0, 1).amax((0, 2)) for a, b in zip(after.qk[layer], before.qk[layer],
                                                                            strict=True)]  # [T] per q, k
        return torch.nonzero((changed[0] > RTOL * changed[0].max()) | (changed[1] > RTOL * changed[1].max())
                             ).flatten().tolist()
    rows, cols, _ = moved(before.probs[layer][:1], after.probs[layer][:1])
    return torch.nonzero(rows[0] | cols[0]).flatten().tolist()


def _order_problem(ad, x, sink: _Sink, n: int, order: list[int], dim: int) -> str | None:
    """Perturb the model token behind a few hidden tokens at norm call ``n`` (feeding layer 1): each
    must move its own token of layer 1's attention; words for the first that does not."""
    t = len(order)
    base = sink.probs[1]
    if base.shape[-1] != t or base.shape[-2] != t or not ad.geometry(x).is_global(1) or dim < 0:
        return None  # the attention's tokens are not the hidden state's (windows, pooled keys): nothing to line up
    for j in dict.fromkeys([0, t - 1, t // 2]):
        got = _moved_tokens(sink, _run(ad, x, perturb={n: _noise(12, order[j], dim)})[0], 1)
        if got != [j]:
            where = (f"token {got[0]}" if len(got) == 1 else f"{len(got)} tokens ({', '.join(map(str, got[:4]))}"
                     f"{', ...' if len(got) > 4 else ''})" if got else "no token")
            kept = (" The hidden states are in the model's own token order, the attention in the layout's: "
                    "reorder the hidden states as the tap reorders q and k (probekit.tokens.prefix_first).")
            return (f"the hidden states are not in the layout's token order (as the attention is): hidden token {j} "
                    f"is what layer 1's attention has at {where}."
                    + (kept if order == list(range(t)) and len(got) == 1 else ""))
    return None


def check_hidden_is_block_output(name: str, pm) -> str:
    # A hidden-state tap must report each block's output, the residual stream, as the next attention
    # reads it: a branch (the MLP output alone), the block's input (one block behind) or the state
    # halfway through a block (the MLP half missing) have the right shape and are finite, so they are
    # told apart on the model itself (module docstring), and so are tokens in another order than the
    # layout's (a class token left last).
    ad = adapter_of(pm)
    x = kit_input(ad, 1, seed=6)
    sink, calls = _run(ad, x, record=True)
    layers = ad.num_layers
    missing = [i for i in range(layers) if i not in sink.hiddens]
    assert not missing, f"{name}: no hidden states for layers {missing}"
    if not calls.norms:
        raise SkipCheck(f"{name}: the forward ran no torch normalization (layer_norm, rms_norm, group_norm) whose "
                        "input the hidden states could be compared with")
    if layers < 2:
        raise SkipCheck(f"{name}: one layer: a hidden state is checked against what the next layer's attention reads")
    feeds = {layer: _feeding_norm(ad, x, sink, calls, layer) for layer in range(layers)}
    lost = [i for i in range(1, layers) if feeds[i] is None]
    if lost:
        raise SkipCheck(f"{name}: no norm call of the model feeds the attention of layers {lost} (perturbing the "
                        "input of each norm called before the tap reported the layer moved no attention, or an "
                        "earlier one first), so the hidden states cannot be compared with what they read; are the "
                        "tap's layers the model's, under its own indices (check_reference_attention says)?")
    found = {layer: n for layer, n in feeds.items() if n is not None}
    problems: list[tuple[int, str]] = []
    orders: dict[int, tuple[list[int], str]] = {}
    for layer in range(layers - 1):
        h, (x_in, x_out) = sink.hiddens[layer], calls.norms[found[layer + 1]]
        order, what = _order(h, x_in), "input"
        if order is None:
            order, what = _order(h, x_out), "output"  # post-norm blocks: the norm's output is the stream
        if order is None:
            problems.append((layer, _what_it_is(layer, h, calls.norms, feeds)))
        else:
            orders[layer] = (order, what)
    others = f" (layers {[i for i, _ in problems[1:]]} fail too)" if len(problems) > 1 else ""
    assert not problems, f"{name}: {problems[0][1]}{others}" if problems else ""
    shuffled = [i for i, (o, _) in orders.items() if o != orders[0][0]]
    assert not shuffled, f"{name}: the hidden states of layers {shuffled} are in another token order than layer 0's"
    fit = _as_tokens(calls.norms[found[1]][0], sink.hiddens[0])
    assert fit is not None  # layer 0's hidden state matched this norm's input or output, of the same shape
    wrong = _order_problem(ad, x, sink, found[1], orders[0][0], fit[1])
    assert wrong is None, f"{name}: {wrong}"
    said = {w for _, w in orders.values()}
    return (f"layers 0..{layers - 2} are the {'/'.join(sorted(said))} of the norm that feeds the next layer's "
            "attention (found by perturbation), in that attention's token order")
