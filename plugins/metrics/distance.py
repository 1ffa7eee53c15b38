"""Mean attention distance (MAD), Dosovitskiy et al. 2021, Fig. 7 and appendix D.7."""

from __future__ import annotations

import torch

from probekit.errors import ConfigError
from probekit.metric import Metric
from probekit.tokens import TokenLayout

_UNITS = ("px", "patch", "fraction")


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

    Returns:
        ``[B, H]`` per image and head.

    >>> import torch, probekit as pk
    >>> lay = pk.TokenLayout(num_prefix=0, grid=(14, 14), patch_size=(16, 16))
    >>> uniform = torch.full((1, 1, 196, 196), 1 / 196)
    >>> round(MeanAttentionDistance().compute(uniform, lay).item(), 2)
    116.49
    """

    name = "mad"
    description = "mean attention distance: attention-weighted query-key distance (px by default)"
    citation = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words, Fig. 7 / D.7"

    def __init__(self, renormalize: bool = False, units: str = "px"):
        if units not in _UNITS:
            raise ConfigError(f"units must be one of {', '.join(_UNITS)}; got {units!r}.")
        self.renormalize = bool(renormalize)
        self.units = units
        super().__init__()

    def value_unit(self) -> str:
        return {"px": "px", "patch": "patches", "fraction": "fraction of grid"}[self.units]

    def _distance_rows(self, layout: TokenLayout, rows: slice, device) -> torch.Tensor:
        p = layout.num_prefix
        if self.units == "px":
            d = layout.pixel_distances(device)
        else:
            d = layout.grid_distances(device)
            if self.units == "fraction":
                d = d / max(max(layout.grid) - 1, 1)
        return d[rows.start - p : rows.stop - p]

    def row_values(self, probs: torch.Tensor, layout: TokenLayout, rows: slice) -> torch.Tensor:
        a = probs[..., layout.num_prefix :]
        if self.renormalize:
            a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        d = self._distance_rows(layout, rows, probs.device)
        return torch.einsum("bhrn,rn->bhr", a, d)
