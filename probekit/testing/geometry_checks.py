"""Adapter checks of the per-layer geometry against the model itself, with no reference: which
tokens a perturbed patch moves in every layer (:mod:`probekit.testing.reach` says which it
may and must move), and which keys the model hides from each query (a shifted window's mask).

Both run on every kind of layer (global, windows, shifted windows, pooled keys, class
attention); a layer the geometry describes as token attention that the tap does not report is
a failure, never a skip.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from probekit.adapter import CollectSink
from probekit.geometry import KINDS
from probekit.testing.geometry import PREFIX_AFTER, coverage_problem, diagnose_moves, moved, probe_boxes
from probekit.testing.reach import Embed, as_geometry, counted, expected_moves
from probekit.testing.reference import (
    deviation,
    prefix_last_reference,
    scale_hint,
    shift_hint,
    tap_and_reference,
)
from probekit.testing.tapping import adapter_of, kit_input, sized, tapped
from probekit.tokens import TokenLayout, pair

__all__ = ["check_patch_geometry", "check_hidden_keys", "patch_embedding"]

HIDDEN = 1e-22  # ~e^-50: a -100 mask (Swin, SAM) is far below, any visible key of a sane model far above


def patch_embedding(ad, layout: TokenLayout) -> Embed | None:
    """(kernel, stride, padding) px of the model's first convolution over the image, where it
    overlaps (a kernel other than its stride, or padding) and steps one layout patch; else None.

    Why read the model: a token of an overlapping embedding (PiT, MViTv2) reads pixels of its
    neighbours' cells, which the layout's cells do not say; a model without such a convolution
    (ONNX graphs, linear patch embeddings) has non-overlapping patches.
    """
    model = getattr(ad, "model", None)
    if not isinstance(model, nn.Module):
        return None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == getattr(ad, "in_chans", 3):
            k, s, p = pair(m.kernel_size), pair(m.stride), m.padding
            if isinstance(p, str) or s != tuple(layout.patch_size) or (k == s and tuple(p) == (0, 0)):
                return None
            return k, s, pair(p)
    return None


def _where(g, group: int, idx: int, keys: bool) -> str:
    kinds = g.key_kind if keys else g.query_kind
    kind = KINDS[int(kinds[group, idx])]
    if kind != "patch":
        return kind
    y, x = (g.key_pos if keys else g.query_pos)[group, idx].tolist()
    return f"({y:g}, {x:g}) px" + (f" [window {group}]" if g.groups > 1 else "")


def _tokens(g, mask: torch.Tensor, keys: bool, most: int = 4) -> str:
    hits = torch.nonzero(mask).tolist()
    words = ", ".join(_where(g, gi, t, keys) for gi, t in hits[:most])
    return words + (f" and {len(hits) - most} more" if len(hits) > most else "")


def _hint(g) -> str:
    if g.kind == "window" and g.visible is not None:
        return ("this is a shifted window: undo the cyclic roll (token centres in the original image, in the "
                "library's order of padding and rolling) and keep each region's mask")
    if g.kind == "pooled":
        return "pooled keys sit at the centre of their stride cell (kv_cell px), queries at their own"
    return "check the layer's grid, stride, window and shift"


def _layer_moves(g, before, after, exp) -> tuple[list[str], float]:
    """Words for the tokens that moved against ``exp`` (:class:`~probekit.testing.reach.Expected`)."""
    mq, mk, top = moved(before, after, counted(g))
    words = []
    for what, got, must, may, keys in (("query", mq, exp.must_q, exp.may_q, False),
                                       ("key", mk, exp.must_k, exp.may_k, True)):
        if (must & ~got).any():
            words.append(f"did not move the {what} tokens at {_tokens(g, must & ~got, keys)} that hold its pixels")
        if (got & ~may).any():
            reach = "a token whose cell it covers" if exp.exact else "what it can reach by this layer"
            words.append(f"moved {what} tokens at {_tokens(g, got & ~may, keys)}, beyond {reach}")
    return words, top


def _diagnosis(i: int, layer, p: torch.Tensor, patches: list) -> str:
    """The input layout's mistake in words, when a global layer 0 ``[1 + len(patches), H, T, T]`` (of any
    size) is wrong: the tokens each probe patch moved say which prefix count or grid order it has."""
    if i != 0 or not isinstance(layer, TokenLayout) or p.shape[-1] != p.shape[-2] or p.shape[0] != 1 + len(patches):
        return ""
    seen = {}
    for j, rc in enumerate(patches, start=1):
        rows, cols, _ = moved(p[:1], p[j : j + 1])
        seen[rc] = frozenset(torch.nonzero(rows[0] | cols[0]).flatten().tolist())
    why = diagnose_moves(layer, seen, num_tokens=p.shape[-1])
    return " " + why[0].upper() + why[1:]


def _verdict(i: int, p: torch.Tensor, layers: list, boxes: dict, expected: dict) -> tuple[str | None, float]:
    """``(words or None, largest change)`` for layer ``i``'s attention ``p`` over the unperturbed image
    and one copy per probe patch (``boxes``), against ``expected[patch][i]``."""
    g, p, top, n = as_geometry(layers[i]), p.float().cpu(), 0.0, 1 + len(boxes)
    if g is None:
        return f"layer {i} is reported, but its geometry says it has no token attention.", top
    if p.shape[0] != n * g.groups or tuple(p.shape[-2:]) != (g.num_queries, g.num_keys):
        said = f"layer {i} attention {tuple(p.shape)} does not fit its geometry ({g.describe()})."
        return said + _diagnosis(i, layers[i], p, list(boxes)), top
    p = p.reshape(n, g.groups, *p.shape[1:])
    moved = []
    for j, (rc, box) in enumerate(boxes.items(), start=1):
        words, score = _layer_moves(g, p[0], p[j], expected[rc][i])
        top = max(top, score)
        if words:
            moved.append(f"patch {rc} (pixels [{box[0]}:{box[1]}, {box[2]}:{box[3]}]) " + " and ".join(words))
    if not moved:
        return None, top
    why = _diagnosis(i, layers[i], p.flatten(0, 1), list(boxes))
    if PREFIX_AFTER in why:  # the model's token order, not a geometry: said in one line, first
        return f"layer {i}:{why}", top
    return (f"layer {i} ({g.describe()}): " + "; ".join(moved[:3]) + f". Hint: {_hint(g)}." + why), top


def _not_the_layout(name: str, ad, x: torch.Tensor) -> str:
    """Words for a tap that differs from the model's attention in a way no layout explains (a wrong
    softmax scale; layers numbered off by one), which a geometry failure must not blame on the
    layout, else ''."""
    try:
        sink, ref, _ = tap_and_reference(name, ad, x)
    except Exception:  # no reference to compare with (a diagnosis only: the geometry's own words stand)
        return ""
    got, n = sink.probs, ad.layout(x).num_prefix
    allowed = {i: max(1e-5, sink.rounding.get(i, 0.0)) for i in got}
    for want in (ref, prefix_last_reference(ref, n) or {}):  # the model's order, or its appended prefix moved first
        if 0 not in want or 0 not in got or deviation(got[0], want[0]) <= allowed[0]:
            continue
        said = shift_hint(got, want, allowed) or scale_hint(got[0], want[0])
        if said:
            return said[2:]
    return ""


class _Judge(CollectSink):
    """A sink that judges each layer's attention as the tap reports it and keeps only the verdict
    ``{layer: (words or None, largest change)}``: memory stays one layer's attention, whatever the depth."""

    def __init__(self, judge):
        super().__init__()
        self.judge, self.judged = judge, {}

    def attention(self, layer, attn):
        self.judged[layer] = self.judge(layer, attn.probs())


@sized
def check_patch_geometry(name: str, pm, image_size=None) -> str:
    # Distances come from each layer's geometry: perturb the pixels of one patch (corners and the
    # interior) and the first layer must move exactly the tokens its geometry puts there, every
    # later layer only tokens the box can have reached through the layers before, and always the
    # tokens at the box (probekit.testing.reach has the reasoning).
    ad = adapter_of(pm)
    base = kit_input(ad, 1, image_size, seed=4)
    size = (base.shape[-2], base.shape[-1])
    lay, geo = ad.layout(base), ad.geometry(base)
    embed = patch_embedding(ad, lay)
    problems = [p for p in [coverage_problem(lay, size, embed)] if p]
    boxes = probe_boxes(lay, size)
    gen = torch.Generator().manual_seed(5)
    batch = [base]
    for y0, y1, x0, x1 in boxes.values():
        x = base.clone()
        x[..., y0:y1, x0:x1] += 3 * torch.randn(x[..., y0:y1, x0:x1].shape, generator=gen).to(x.device)
        batch.append(x)
    layers = [geo.layer(i) for i in range(ad.num_layers)]
    token_layers = [i for i, layer in enumerate(layers) if as_geometry(layer) is not None]
    expected = {rc: expected_moves(layers, box, size, lay, embed) for rc, box in boxes.items()}

    verdict = functools.partial(_verdict, layers=layers, boxes=boxes, expected=expected)
    judged = tapped(ad, torch.cat(batch), sink=_Judge(verdict))[0].judged  # one layer's attention at a time
    if [i for i in token_layers if i not in judged]:
        problems.append(f"the geometry describes token attention in layers {token_layers}, the tap reported "
                        f"{sorted(judged)}.")
    wrong = [said for i, (said, _) in sorted(judged.items()) if said]
    top = max((t for _, t in judged.values()), default=0.0)
    problems += wrong[:1] if wrong and PREFIX_AFTER in wrong[0] else wrong[:2]  # later layers follow from it
    said = f"{name}: geometry at {size[0]}x{size[1]} ({lay.describe()}): "
    other = _not_the_layout(name, ad, base) if problems else ""
    assert not other, (said + f"the tap is not the model's attention: {other}; that moves tokens no layout "
                       "explains: fix it, then this check judges the layout")
    assert not problems, said + " ".join(problems)
    return (f"{len(boxes)} patches x {len(token_layers)} layers: each moved its own tokens in layer 0 and "
            f"stayed within its reach after (largest logit change {top:.2g})")


def check_hidden_keys(name: str, pm) -> str:
    # A query's distances average over the keys its geometry says it sees: a key the model masks
    # (a shifted window's other regions) must be hidden in the geometry too, and the reverse.
    ad = adapter_of(pm)
    x = kit_input(ad, 2, seed=7)
    probs, geo = tapped(ad, x)[0].probs, ad.geometry(x)
    problems, masked = [], 0
    for i, p in sorted(probs.items()):
        g = as_geometry(geo.layer(i))
        if g is None or geo.is_global(i) or p.shape[0] != 2 * g.groups:
            continue  # global layers hide nothing; a misfit shape is check_layout_matches_tokens' to say
        pmax = p.float().cpu().reshape(2, g.groups, *p.shape[1:]).amax(dim=(0, 2))  # [G, Tq, Tk]
        vis = torch.ones_like(pmax, dtype=torch.bool) if g.visible is None else g.visible
        leak, shut = pmax.masked_fill(vis, 0).max().item(), int(((pmax < HIDDEN) & vis).sum())
        masked += int((~vis).sum())
        if leak >= HIDDEN:
            problems.append(f"layer {i} ({g.describe()}) gives weight up to {leak:.2g} to keys its geometry hides")
        if shut:
            problems.append(f"layer {i} ({g.describe()}) hides {shut} query-key pairs (weight < {HIDDEN:g}) that its "
                            "geometry says are visible: describe the model's mask in LayerGeometry.visible")
    assert not problems, f"{name}: " + "; ".join(problems[:3]) + "."
    return f"the model hides exactly the {masked} query-key pairs per image its geometry hides"
