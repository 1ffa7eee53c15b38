"""Mean attention distance (MAD), Dosovitskiy et al. 2021, Fig. 7 and appendix D.7."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import AfterValidator, Field

from probekit.geometry import ChannelAttention, LayerGeometry
from probekit.metric import Block, Metric
from probekit.metric.patch_keys import patch_mass_is_safe
from probekit.tokens import TokenLayout

Units = Literal["px", "patch", "fraction"]


def uniform_mad(layer: TokenLayout | LayerGeometry, units: str = "px") -> float:
    """MAD of uniform attention over every key a query sees (prefix and padding keys count as 0 px):
    the "no locality" level of a layer, what a random-init model measures and plots draw.

    >>> round(uniform_mad(LayerGeometry.windows((56, 56), 4, 7)), 2)  # Swin stage 1
    14.44
    """
    if isinstance(layer, TokenLayout):
        d = layer.pixel_distances() if units == "px" else layer.grid_distances()
        if units == "fraction":
            d = d / max(max(layer.grid) - 1, 1)
        return float(d.double().mean()) * layer.num_patches / layer.num_tokens
    u = layer.uniform()[:, 0]
    d = layer.distances(units) * layer.visible_patch_keys() * layer.query_mask()[..., None]
    return float((u * d).sum() / layer.queries_per_image())


class MeanAttentionDistance(Metric):
    """Attention-weighted query-key distance per head (Dosovitskiy et al. 2021, D.7).

    For each query patch ``q``: ``sum_k A[q, k] * d(q, k)`` over patch keys ``k``, where ``d``
    is the Euclidean distance between patch positions (self-distance 0); then the mean over
    query patches. Prefix tokens are dropped from queries and keys. By default rows are NOT
    renormalized, as in the reference notebook: mass on prefix tokens counts as distance 0.

    Args:
        renormalize: rescale each query row to sum to 1 over patch keys (Walmer et al. 2023,
            Park et al. 2023).
        units: ``"px"`` (grid distance x patch size), ``"patch"`` (grid steps) or ``"fraction"``
            (grid steps / (max(h, w) - 1), Walmer et al.'s [0, 1] grid).
        queries: ``"patches"`` (default) or ``"cls"``. The CLS token has no position, so for
            ``"cls"`` the distance is that of each attended patch from the image centre:
            ``sum_k A[cls, k] * |pos(k) - centre|``, the spread of the CLS attention.

    Returns:
        ``[B, H]`` per image and head.

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=0, grid=(14, 14), patch_size=(16, 16))
    >>> uniform = torch.full((1, 1, 196, 196), 1 / 196)
    >>> round(MeanAttentionDistance().compute(uniform, lay).item(), 2)
    116.49
    """

    name = "mad"
    display_name = "mean attention distance"
    requires = ()  # windowed, pooled and class-attention layers: see probekit.geometry
    description = "mean attention distance: attention-weighted query-key distance (px by default)"
    citation = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words, Fig. 7 / D.7"

    renormalize: bool = False
    units: Units = "px"
    queries: Literal["patches", "cls"] = "patches"
    kernel_terms = frozenset({"dist", "patch_mass"})
    query_tokens = property(lambda self: self.queries)
    unit = property(lambda self: {"px": "px", "patch": "patches", "fraction": "fraction of grid"}[self.units])

    def reference_value(self, layer: TokenLayout | LayerGeometry) -> float | None:
        """MAD of uniform attention over every token: the "no locality" level.

        On a global ``layer`` (a :class:`TokenLayout`), uniform attention gives each of the
        ``N + prefix`` keys ``1 / (N + prefix)``, so MAD is the mean pairwise distance of the ``N``
        grid positions (self included, patch size applied per axis) times ``N / (N + prefix)``;
        with ``renormalize`` the prefix mass is dropped. For CLS queries: the mean distance of the
        patches from the image centre. On a windowed, pooled or staged layer: :func:`uniform_mad`,
        with the default ``queries`` and ``renormalize`` (None otherwise, and for channel attention).

        >>> lay = TokenLayout(num_prefix=0, grid=(14, 14), patch_size=(16, 16))
        >>> round(MeanAttentionDistance().reference_value(lay), 2)
        116.49
        """
        if not isinstance(layer, TokenLayout):
            if self.renormalize or self.queries != "patches" or isinstance(layer, ChannelAttention):
                return None
            return uniform_mad(layer, self.units)
        h, w = layer.grid
        ph, pw = layer.patch_size if self.units == "px" else (1, 1)
        ys, xs = np.divmod(np.arange(h * w), w)
        if self.queries == "cls":
            dy, dx = (ys - (h - 1) / 2) * float(ph), (xs - (w - 1) / 2) * float(pw)
        else:
            dy = (ys[:, None] - ys[None, :]) * float(ph)
            dx = (xs[:, None] - xs[None, :]) * float(pw)
        mean = float(np.sqrt(dy**2 + dx**2).mean())
        if self.units == "fraction":
            mean /= max(max(h, w) - 1, 1)
        n = h * w
        return mean if self.renormalize else mean * n / (n + layer.num_prefix)

    def row_values(self, block: Block) -> torch.Tensor | None:
        """``sum_k A[q, k] d(q, k)`` over the patch keys of each query row ``q``.

        From the kernels' per-row distance sums where the block has them (not for CLS queries,
        whose distances from the image centre are no kernel term; with ``renormalize`` divided by
        the patch mass while it has digits to spare); on windowed and pooled layers over the patch
        keys each query sees, distances in the original image frame (:mod:`probekit.geometry`);
        else the rows' sum in one matrix-vector product over the block (the prefix keys' distances
        padded with 0): a row axis of length 1.
        """
        if block.terms is not None:
            if self.queries == "cls":
                return None
            v = _kernel_distances(block.terms, self.units, block.layout)
            if self.renormalize:
                if not patch_mass_is_safe(block.terms.patch_mass):
                    return None  # patch-key probabilities underflowed: ask again with the logits
                v = v / block.terms.patch_mass
            return v
        probs = block.probs
        assert probs is not None
        if block.geometry is not None:
            geo = block.geometry
            d = geo.cached(("mad", self.units, str(probs.device)), lambda: (
                geo.distances(self.units, probs.device) * geo.visible_patch_keys(probs.device)))
            return torch.einsum("nhqk,nqk->nhq", block.patch_rows(self.renormalize), d[block.groups])
        layout = block.layout
        assert layout is not None
        q0 = query_span_start(layout, self.queries)
        d = _padded_distances(layout, self.units, self.queries, str(probs.device))[block.rows.start - q0:
                                                                                   block.rows.stop - q0]
        if self.renormalize:
            return torch.einsum("bhrn,rn->bhr", block.patch_rows(True), d[:, layout.num_prefix:])
        # the rows' sum in one pass (a row axis of 1): <probs[b, h], D_rows> as one matrix-vector product
        b, h, r, t = probs.shape
        return torch.mv(probs.reshape(b * h, r * t), d.reshape(-1)).view(b, h, 1)


def query_span_start(layout: TokenLayout, queries: str) -> int:
    """The first query row of MAD's ``queries`` in ``layout``."""
    return layout.cls_index("metric 'mad'") if queries == "cls" else layout.num_prefix


def _kernel_distances(terms, units: str, layout: TokenLayout | None) -> torch.Tensor:
    """The kernel's per-row ``sum_k p d`` in ``units`` (it sums pixel and grid-step distances)."""
    if units == "px":
        return terms.dist_px
    assert layout is not None
    return terms.dist_grid / max(max(layout.grid) - 1, 1) if units == "fraction" else terms.dist_grid


def _patch_distances(layout: TokenLayout, units: str, device, dtype=torch.float32) -> torch.Tensor:
    """Distance between every pair of patches, ``[N, N]``, in ``units``."""
    if units == "px":
        return layout.pixel_distances(device, dtype)
    d = layout.grid_distances(device, dtype)
    return d / max(max(layout.grid) - 1, 1) if units == "fraction" else d


@lru_cache(maxsize=4)
def _padded_distances(layout: TokenLayout, units: str, queries: str, device: str) -> torch.Tensor:
    """MAD's query rows' distances to all T keys, zero on the prefix keys, ``[R, T]``."""
    if queries == "cls":
        d = _centre_distances(layout, units, device)[None]
    else:
        d = _patch_distances(layout, units, device)
    full = d.new_zeros(d.shape[0], layout.num_tokens)
    full[:, layout.num_prefix :] = d
    return full


def _centre_distances(layout: TokenLayout, units: str, device) -> torch.Tensor:
    """Distance of each patch centre from the image centre, ``[N]``, in ``units``."""
    h, w = layout.grid
    yx = layout.coords(device) - torch.tensor([(h - 1) / 2, (w - 1) / 2], device=device)
    if units == "px":
        yx = yx * torch.tensor(layout.patch_size, dtype=yx.dtype, device=device)
    d = yx.norm(dim=-1)
    return d / max(max(h, w) - 1, 1) if units == "fraction" else d


def _check_bins(bins: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """Left bin edges increasing from 0 (a pydantic validator: its ValueError names the rule)."""
    # each edge with the next (bins[1:] is one shorter, hence strict=False)
    if bins is not None and (not bins or bins[0] != 0 or any(b <= a for a, b in zip(bins, bins[1:], strict=False))):
        raise ValueError("bins must be left edges increasing from 0, e.g. [0, 16, 32, 64]")
    return bins


_DEFAULT_BINS = {
    "px": tuple(float(e) for e in range(0, 321, 16)),
    "patch": tuple(float(e) for e in range(0, 21)),
    "fraction": tuple(i / 10 for i in range(0, 15)),
}


class DistanceProfile(Metric):
    """Attention-weighted histogram of query-key distances per head: the profile behind MAD.

    For a query patch ``q`` and distance bins ``[e_i, e_{i+1})``::

        P_q[i] = sum_k A[q, k] * [e_i <= d(q, k) < e_{i+1}]      (patch keys k)

    then the mean over query patches. ``d`` is the same distance as MAD's (self-distance 0,
    so bin 0 holds the attention a patch pays to itself), rows are not renormalized by
    default, and the bins sum to the mass on patch keys (``1 - prefix_mass``). MAD is the
    profile's mean, ``sum_i P[i] * d``, so heads with equal MAD but different shapes
    (local + global versus medium range) tell apart here (Dosovitskiy et al. 2021, D.7;
    Raghu et al. 2021 plot the same distances per head).

    Args:
        bins: left edges of the bins, increasing from 0, in ``units``; the last bin is open
            above, so every patch key falls in a bin. Default: every 16 px to 320 px
            (``patch``: every patch to 20; ``fraction``: every 0.1 to 1.4).
        units: ``"px"``, ``"patch"`` or ``"fraction"``, as for MAD.
        renormalize: rescale each query row to sum to 1 over patch keys.

    Returns:
        ``[B, H, len(bins)]`` per image and head (a map: stored in ``Results.arrays``).

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=0, grid=(1, 3), patch_size=(16, 16))
    >>> uniform = torch.full((1, 1, 3, 3), 1 / 3)
    >>> [round(v, 3) for v in DistanceProfile(bins=[0, 16, 32]).compute(uniform, lay)[0, 0].tolist()]
    [0.333, 0.444, 0.222]
    """

    name = "distance_profile"
    requires = ()
    description = "attention-weighted histogram of query-key distances (bins in px by default)"
    citation = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words, D.7"
    is_map = True
    unit = "fraction of attention"

    bins: Annotated[tuple[float, ...] | None, AfterValidator(_check_bins), Field(examples=[(0, 8, 64)])] = None
    units: Units = "px"
    renormalize: bool = False
    kernel_terms = frozenset({"hist", "patch_mass"})

    def __init__(self, **options):
        super().__init__(**options)
        self.edges = self.bins or _DEFAULT_BINS[self.units]

    def kernel_histogram(self, layout: TokenLayout) -> tuple[tuple[float, float], tuple[float, ...]]:
        """The kernel's histogram: per-axis grid-step lengths in ``units`` and squared left edges."""
        if self.units == "px":
            step = (float(layout.patch_size[0]), float(layout.patch_size[1]))
        else:
            f = 1.0 / max(max(layout.grid) - 1, 1) if self.units == "fraction" else 1.0
            step = (f, f)
        return step, tuple(e * e for e in self.edges)

    def row_values(self, block: Block) -> torch.Tensor | None:
        """Each query row's attention mass per distance bin, ``[n, H, R, bins]``.

        From the kernels' per-row histogram where it was made with these bins; on windowed and
        pooled layers over the patch keys each query sees; else one product of the block's patch-key
        rows with the one-hot bin of every (query, key) pair.
        """
        if block.terms is not None:
            t = block.terms
            if t.hist is None or block.layout is None or t.hist_spec != self.kernel_histogram(block.layout):
                return None  # the kernel ran another metric's bins
            if not self.renormalize:
                return t.hist
            if not patch_mass_is_safe(t.patch_mass):
                return None  # patch-key probabilities underflowed: ask again with the logits
            return t.hist / t.patch_mass[..., None]
        a = block.patch_rows(self.renormalize)
        if block.geometry is not None:
            geo = block.geometry
            idx = geo.cached(("bins", self.units, self.edges, str(a.device)), lambda: _bins(
                geo.distances(self.units, dtype=torch.float64), self.edges).to(a.device))[block.groups]
            n, h, r, k = a.shape
            out = a.new_zeros(n, h, r, len(self.edges))
            return out.scatter_add_(3, idx[:, None].expand(n, h, r, k), a)
        layout = block.layout
        assert layout is not None
        p = layout.num_prefix
        idx = _bin_index(layout.grid, layout.patch_size, self.units, self.edges, str(a.device))
        onehot = torch.nn.functional.one_hot(idx[block.rows.start - p : block.rows.stop - p], len(self.edges))
        return torch.einsum("bhrn,rnk->bhrk", a, onehot.to(a.dtype))


@lru_cache(maxsize=16)
def _bin_index(grid, patch_size, units: str, edges: tuple, device: str) -> torch.Tensor:
    """Bin of every (query, key) patch pair, ``[N, N]`` long (exact at bin edges)."""
    lay = TokenLayout(num_prefix=0, grid=grid, patch_size=patch_size)
    d = _patch_distances(lay, units, "cpu", torch.float64)
    return _bins(d, edges).to(device)


def _bins(d: torch.Tensor, edges: tuple) -> torch.Tensor:
    """Bin index of each float64 distance in ``d`` for left ``edges`` (exact at bin edges)."""
    e = torch.tensor(edges[1:], dtype=torch.float64)
    # a distance equal to an edge belongs above it; the relative slack keeps it there when the
    # distance and the edge were rounded differently on their way (cdist, unit scaling)
    return torch.searchsorted(e * e, (d * d) * (1 + 1e-9), right=True)
