"""Geometry checks that trust nothing the adapter says: perturb the pixels of one patch and
see which tokens move in layer 0's attention.

Why this pins the layout without a reference. Before the first attention mixes tokens, a
token's q and k depend on its own patch only (patch embedding, position table, norms and
projections all act per token). Perturbing the pixels of one patch therefore changes layer 0's
logits in that token's row and column only. The probabilities see this up to one constant per
row (the softmax normaliser), which :func:`moved_tokens` removes before it looks. The token
that moves must be the one the layout places at those pixels: a wrong prefix count shifts it,
a transposed grid (or a column-major flattening) sends it elsewhere on a non-square grid, a
wrong patch size moves several tokens or none, or puts the patch outside the image.

The expected tokens come from one function, :func:`expected_moved_tokens`, of the layout or of a
first layer's :class:`~probekit.geometry.LayerGeometry` (windows, shifted windows, pooled keys);
:mod:`probekit.testing.reach` carries the reasoning through every later layer.
"""

from __future__ import annotations

import torch

from probekit.geometry import LayerGeometry
from probekit.testing.reach import Box, Embed, as_geometry, expected_moves
from probekit.tokens import TokenLayout

__all__ = ["PREFIX_AFTER", "expected_moved_tokens", "probe_patches", "probe_boxes", "patch_box", "moved",
           "moved_tokens", "coverage_problem", "diagnose_moves"]


PREFIX_AFTER = "after the patches"  # the words of the one diagnosis that is no layout mistake


def patch_box(layout: TokenLayout, r: int, c: int) -> Box:
    """The input pixels of patch ``(r, c)`` as the layout places it."""
    ph, pw = layout.patch_size
    return (r * ph, (r + 1) * ph, c * pw, (c + 1) * pw)


def expected_moved_tokens(layer: TokenLayout | LayerGeometry, box: Box, embed: Embed | None = None):
    """Tokens whose q and k read pixels inside ``box`` when ``layer`` is the model's first attention.

    A global layout: token ``num_prefix + r * grid_w + c`` covers pixels ``[r*ph, (r+1)*ph) x
    [c*pw, (c+1)*pw)``; prefix tokens read no pixels; returns the token indices. A
    :class:`LayerGeometry` (windows, a shifted window's roll undone, padding, pooled keys):
    returns ``(queries, keys)``, each a frozenset of ``(group, index)``. ``embed``: the patch
    embedding's (kernel, stride, padding) px where patches overlap (PiT, MViTv2).
    """
    g = as_geometry(layer)
    lay = layer if isinstance(layer, TokenLayout) else TokenLayout(0, g.grid, g.stride)
    size = (max(box[1], g.image_size[0]), max(box[3], g.image_size[1]))
    exp = expected_moves([g], box, size, lay, embed)[0]
    queries = frozenset(map(tuple, torch.nonzero(exp.may_q).tolist()))
    keys = frozenset(map(tuple, torch.nonzero(exp.may_k).tolist()))
    if isinstance(layer, TokenLayout):
        return frozenset(t for _, t in queries | keys)
    return queries, keys


def probe_patches(layout: TokenLayout) -> list[tuple[int, int]]:
    """Patches to perturb: the four corners and one off-centre interior patch (distinct ones)."""
    gh, gw = layout.grid
    cells = [(0, 0), (0, gw - 1), (gh - 1, 0), (gh - 1, gw - 1), (gh // 2, gw // 3)]
    return list(dict.fromkeys(cells))


def probe_boxes(layout: TokenLayout, size: tuple[int, int]) -> dict[tuple[int, int], Box]:
    """The probe patches' pixel boxes clipped to an input of ``size``; patches that start outside
    it are left out (:func:`coverage_problem` says why)."""
    boxes = {}
    for r, c in probe_patches(layout):
        y0, y1, x0, x1 = patch_box(layout, r, c)
        if y0 < size[0] and x0 < size[1]:
            boxes[(r, c)] = (y0, min(y1, size[0]), x0, min(x1, size[1]))
    return boxes


def coverage_problem(layout: TokenLayout, size: tuple[int, int], embed: Embed | None = None) -> str | None:
    """Why ``layout`` cannot describe an input of ``size`` pixels, or None.

    A grid of patches covers the input to within one patch (libraries floor, some pad); patches
    of an overlapping embedding (``embed``: kernel, stride, padding) reach ``kernel - stride``
    px further.
    """
    (gh, gw), (ph, pw) = layout.grid, layout.patch_size
    (kh, kw), _, (pad_h, pad_w) = embed or ((ph, pw), None, (0, 0))
    ext_h, ext_w = (gh - 1) * ph + kh - 2 * pad_h, (gw - 1) * pw + kw - 2 * pad_w
    h, w = size
    if abs(h - ext_h) < ph and abs(w - ext_w) < pw:
        return None
    said = f"the layout's {gh}x{gw} grid of {ph}x{pw} px patches covers {ext_h}x{ext_w} px"
    if abs(h - gw * pw) < pw and abs(w - gh * ph) < ph and (gh, gw) != (gw, gh):
        return (f"{said} but the input is {h}x{w}: rows and columns are swapped (grid is (h, w) = "
                f"({h // ph}, {w // pw}), not ({gh}, {gw})).")
    return (f"{said} but the input is {h}x{w}: with these patches the grid would be {h // ph}x{w // pw}; "
            "check the patch size and the grid.")


def moved(before: torch.Tensor, after: torch.Tensor, counted: torch.Tensor | None = None, rel: float = 1e-2,
          floor: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Which queries' rows and keys' columns of the logits changed between two ``[G, H, Tq, Tk]``
    probabilities (``G`` groups: windows; ``counted``: ``[G, Tq, Tk]``, the entries that count).

    Log-probabilities are logits up to one constant per row; the median change of a row is
    that constant (fewer than half of a row's keys move), so subtracting it leaves the logit
    changes. A query moved when its row changed for most of its visible keys, a key when its
    column did (the median again: an unmoved token's row changes in the moved tokens' columns
    only). Entries not counted (a shifted window's hidden keys, padding) are left out of every median.

    Returns:
        ``(queries [G, Tq], keys [G, Tk], largest score)``; a score below ``floor`` is no change.
    """
    tiny = torch.finfo(torch.float32).tiny * 1e8
    d = after.double().clamp_min(tiny).log() - before.double().clamp_min(tiny).log()
    if counted is not None:
        d = d.masked_fill(~counted[:, None].to(d.device), float("nan"))
    d = (d - d.nanmedian(dim=-1, keepdim=True).values).abs()  # row constants removed
    rows = d.nanmedian(dim=-1).values.nan_to_num(0).amax(1)  # [G, Tq]: typical change along a row
    cols = d.nanmedian(dim=-2).values.nan_to_num(0).amax(1)  # [G, Tk]: typical change down a column
    top = max(rows.max().item(), cols.max().item())
    if top < floor:
        return torch.zeros_like(rows, dtype=torch.bool), torch.zeros_like(cols, dtype=torch.bool), top
    return rows > rel * top, cols > rel * top, top


def moved_tokens(before: torch.Tensor, after: torch.Tensor, rel: float = 1e-2,
                 floor: float = 1e-5) -> tuple[frozenset[int], float]:
    """Tokens whose row or column of the logits changed between two ``[H, T, T]`` probabilities
    (:func:`moved` for one global layer).

    Returns:
        ``(tokens, largest score)``; a score below ``floor`` counts as no change at all.
    """
    rows, cols, top = moved(before[None], after[None], rel=rel, floor=floor)
    return frozenset(torch.nonzero(rows[0] | cols[0]).flatten().tolist()), top


def diagnose_moves(layout: TokenLayout, seen: dict[tuple[int, int], frozenset[int]],
                   num_tokens: int | None = None) -> str:
    """What layout mistake explains the tokens that moved (``{patch: tokens}``), in words
    (``num_tokens``: how many tokens the model's attention has, where known)."""
    n, (gh, gw) = layout.num_prefix, layout.grid
    expected = {rc: n + rc[0] * gw + rc[1] for rc in seen}
    single = all(len(t) == 1 for t in seen.values())
    if single:
        got = {rc: next(iter(t)) for rc, t in seen.items()}
        shifts = {got[rc] - expected[rc] for rc in seen}
        if len(shifts) == 1 and num_tokens == layout.num_tokens and -n <= min(shifts) < 0:
            d = shifts.pop()  # as many tokens as the layout says, patches early: prefix tokens after them
            return (f"every moved token is {d:+d} from where the layout puts it, and the model has the layout's "
                    f"{num_tokens} tokens: it puts {-d} of its {n} prefix token(s) {PREFIX_AFTER} (a class token "
                    "last), and TokenLayout orders prefix tokens first: move them to the front of q, k and the hidden "
                    "states in the tap (probekit.tokens.prefix_first).")
        if len(shifts) == 1:
            d = shifts.pop()
            return (f"every moved token is {d:+d} from where the layout puts it: the prefix count is wrong "
                    f"(the layout says {n}, the model has {n + d}).")
        if gh != gw and all(got[rc] == n + rc[0] * gh + rc[1] for rc in seen):
            return (f"the moved tokens are where a {gw}x{gh} grid puts them: the layout's grid ({gh}, {gw}) has "
                    "rows and columns swapped; grid is (rows, columns) = (H // ph, W // pw).")
        if all(got[rc] == n + rc[1] * gh + rc[0] for rc in seen):
            return (f"the moved tokens are where a column-major grid puts them (token = {n} + c * {gh} + r): "
                    "the grid is transposed; tokens run row by row, token = num_prefix + r * grid_w + c.")
    if any(len(t) > 1 for t in seen.values()):
        most = max(len(t) for t in seen.values())
        return (f"one patch of the layout ({layout.patch_size[0]}x{layout.patch_size[1]} px) moved up to {most} "
                "tokens: the model's patches are smaller than the layout's patch size.")
    if any(not t for t in seen.values()):
        return ("some patches moved no token at all: the layout places patches on pixels the model does not "
                "read as one token (patch size or grid wrong), or layer 0's attention is not the first "
                "attention of the model.")
    return "the layout's token order does not match the model's (prefix count, grid or patch size)."
