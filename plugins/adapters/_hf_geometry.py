"""transformers families whose layers are not all global: where their attention modules are and
each layer's geometry (:mod:`probekit.geometry`).

- Swin (``SwinModel``): the image is padded to whole patches, each stage's grid padded to whole
  windows and *then* rolled (timm rolls first), windows shrink to the grid and shifts vanish when
  the grid is no larger than a window; patch merging halves the grid (odd sizes padded up) at
  the end of each stage. The window and shift are read from each block as its forward will use
  them (transformers clamps and keeps them on the module).
- Hiera (``HieraModel``): mask units, query pooling and the unrolled token order, shared with
  timm's Hiera in ``_hiera_geometry.py``.
"""

from __future__ import annotations

from torch import nn

from probekit.geometry import LayerGeometry
from probekit.tokens import TokenLayout

from ._hiera_geometry import HF_HIERA

__all__ = ["STAGED"]


def _swin_blocks(encoder: nn.Module) -> list[nn.Module]:
    return [blk for stage in encoder.encoder.layers for blk in stage.blocks]


def _swin_geometry(encoder: nn.Module, layout: TokenLayout) -> dict:
    grid, stride = layout.grid, layout.patch_size
    out, i = {}, 0
    for stage in encoder.encoder.layers:
        for blk in stage.blocks:
            win, shift = int(blk.window_size), int(blk.shift_size)
            if min(grid) <= win:  # what SwinLayer.set_shift_and_window_size does before attending
                win, shift = min(grid), 0
            out[i] = LayerGeometry.windows(grid, stride, win, shift, image_size=layout.image_size,
                                           base_grid=layout.grid, pad_first=True)
            i += 1
        if stage.downsample is not None:
            grid, stride = ((grid[0] + 1) // 2, (grid[1] + 1) // 2), (stride[0] * 2, stride[1] * 2)
    return out


#: family name -> (blocks in layer order, per-layer geometry)
STAGED = {"swin": (_swin_blocks, _swin_geometry), "hiera": HF_HIERA}
