"""Where each token of a ViT sits: prefix tokens first, then a row-major patch grid.

A model whose prefix tokens come elsewhere (a class token appended after the patches) is described
in this order all the same: its tap hands over q, k and hidden states with the prefix tokens moved
to the front (:func:`prefix_first`), and ``probekit.testing`` checks that it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from probekit.errors import LayoutError

__all__ = ["TokenLayout", "pair", "prefix_first"]


def pair(x: float | Sequence[float]) -> tuple[int, int]:
    """``(h, w)`` from one number or a pair of numbers (sizes in configs come in both forms)."""
    if isinstance(x, (int, float)):
        return (int(x), int(x))
    a, b = x
    return (int(a), int(b))


def prefix_first(tokens: torch.Tensor, num_prefix: int, dim: int = -2) -> torch.Tensor:
    """``tokens`` with the last ``num_prefix`` along ``dim`` moved to the front, in their order: a
    class-token-last model's q, k (``dim=-2`` of ``[B, H, T, d]``) or hidden states (``[B, T, D]``)
    in the order :class:`TokenLayout` describes.

    >>> prefix_first(torch.arange(5.0)[:, None], 1).flatten().tolist()
    [4.0, 0.0, 1.0, 2.0, 3.0]
    """
    n = tokens.shape[dim]
    order = torch.cat([torch.arange(n - num_prefix, n), torch.arange(n - num_prefix)]).to(tokens.device)
    return tokens.index_select(dim, order)


@dataclass(frozen=True, init=False)
class TokenLayout:
    """The token sequence of one forward pass.

    Args:
        num_prefix: tokens before the patches (CLS 1, DeiT distilled 2, registers 1 + r, SigLIP 0).
        grid: patch rows and columns ``(h, w)``; token ``num_prefix + i`` is at row ``i // w``,
            column ``i % w``.
        patch_size: patch height and width in input pixels ``(ph, pw)``.
        prefix_kinds: what each prefix token is (``"cls"``, ``"dist"``, ``"reg"``); defaults to
            ``"cls"`` for the first and ``"reg"`` for the rest.

    >>> TokenLayout(num_prefix=1, grid=(14, 14), patch_size=(16, 16)).num_tokens
    197
    """

    num_prefix: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    prefix_kinds: tuple[str, ...]

    # written out (init=False) so that the fields are typed as what they hold (pairs, a tuple of kinds),
    # while the arguments take what configs give (one number for a square, no kinds for the default)
    def __init__(self, num_prefix: int, grid: int | tuple[int, int], patch_size: int | tuple[int, int],
                 prefix_kinds: Sequence[str] | None = None):
        object.__setattr__(self, "num_prefix", num_prefix)
        object.__setattr__(self, "grid", pair(grid))
        object.__setattr__(self, "patch_size", pair(patch_size))
        object.__setattr__(self, "prefix_kinds", prefix_kinds)  # as given, for the message below
        if self.num_prefix < 0 or min(self.grid) < 1 or min(self.patch_size) < 1:
            raise LayoutError(f"Invalid token layout {self!r}: counts and sizes must be positive.")
        kinds = prefix_kinds
        if kinds is None:
            kinds = tuple(("cls" if i == 0 else "reg") for i in range(self.num_prefix))
        if len(kinds) != self.num_prefix:
            raise LayoutError(f"prefix_kinds has {len(kinds)} entries for {self.num_prefix} prefix tokens.")
        object.__setattr__(self, "prefix_kinds", tuple(kinds))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def image_size(self) -> tuple[int, int]:
        """Pixels covered by the grid (the input may be larger when a library floors)."""
        return (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])

    def coords(self, device=None) -> torch.Tensor:
        """Patch centres' ``(row, col)`` grid coordinates, ``[num_patches, 2]`` float."""
        h, w = self.grid
        i = torch.arange(h * w, device=device)
        return torch.stack([i // w, i % w], dim=-1).float()

    def pixel_distances(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Euclidean distance in pixels between every pair of patches, ``[N, N]``, cached."""
        return _distances(self.grid, self.patch_size, str(device or "cpu"), dtype)

    def grid_distances(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Euclidean distance in patches (grid steps) between every pair of patches, cached."""
        return _distances(self.grid, (1, 1), str(device or "cpu"), dtype)

    def check(self, num_tokens: int, where: str = "model") -> None:
        """Raise :class:`LayoutError` unless the layout accounts for ``num_tokens`` tokens."""
        if num_tokens != self.num_tokens:
            raise LayoutError(
                f"The {where} produced {num_tokens} tokens but the layout describes {self.num_tokens} "
                f"({self.num_prefix} prefix + {self.grid[0]}x{self.grid[1]} patches). Check the image "
                "size against the patch size, or pass the layout the model really uses."
            )

    def cls_index(self, what: str = "this metric") -> int:
        """Index of the CLS token, or a :class:`LayoutError` saying what to use instead.

        Args:
            what: who asks (e.g. ``"metric 'mad'"``), for the message.
        """
        try:
            return self.prefix_kinds.index("cls")
        except ValueError:
            raise LayoutError(
                f"{what[:1].upper()}{what[1:]} was asked for CLS queries, but this model has no CLS token "
                f"({self.describe()}). Use the patch queries (queries='patches' / query='mean')."
            ) from None

    def describe(self) -> str:
        kinds = "+".join(self.prefix_kinds) or "none"
        return (
            f"{self.num_prefix} prefix ({kinds}) + {self.grid[0]}x{self.grid[1]} patches of "
            f"{self.patch_size[0]}x{self.patch_size[1]} px = {self.num_tokens} tokens"
        )


@lru_cache(maxsize=32)
def _distances(grid, patch_size, device: str, dtype) -> torch.Tensor:
    h, w = grid
    ph, pw = patch_size
    i = torch.arange(h * w, device=device)
    yx = torch.stack([(i // w).to(torch.float64) * ph, (i % w).to(torch.float64) * pw], -1)
    return torch.cdist(yx, yx).to(dtype)
