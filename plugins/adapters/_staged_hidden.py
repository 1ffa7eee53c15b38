"""Block outputs of staged and windowed models as hidden states, shared by the timm and
transformers adapters.

Each layer's block outputs tokens of its own stage (patch merging, pooled queries, a class token
that joins late). :func:`layer_layouts` derives each block's layout from that layer's attention
geometry (:func:`._timm_geometry.hidden_layout`); :class:`BlockOutputs` hands each block's output
to ``Sink.hidden`` as ``[B, T, C]`` with that layout, its tokens put in row-major order first where
the family's blocks keep another (Hiera's unrolled order: ``_hiera_geometry.row_major``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from probekit.adapter import Sink
from probekit.geometry import ModelGeometry
from probekit.tokens import TokenLayout

from ._timm_geometry import hidden_layout


def layer_layouts(geo: ModelGeometry, num_layers: int) -> dict[int, TokenLayout]:
    """Each layer's block output layout, from its attention geometry."""
    return {i: hidden_layout(geo.layer(i), geo.layout) for i in range(num_layers)}


class BlockOutputs:
    """Hands each block's output to ``sink.hidden`` as ``[B, T, C]`` tokens with the block's own layout
    (computed once per input size, when the model's forward starts: :meth:`start` is a forward
    pre-hook on the model, whose first argument is the pixel values).

    Args:
        adapter: has ``geometry(pixel_values)`` and ``num_layers``.
        tokens: ``(block output, block inputs) -> [B, T, C]``.
        order: ``layer geometry -> index tensor or None``: the sequence position of each row-major
            token, where the blocks keep their tokens in another order (None: row-major already).
    """

    def __init__(self, adapter, sink: Sink, tokens: Callable[[object, tuple], torch.Tensor],
                 order: Callable[[object], torch.Tensor | None] | None = None):
        self.adapter, self.sink, self.tokens, self.order = adapter, sink, tokens, order
        self.size: tuple | None = None
        self.layouts: dict[int, TokenLayout] = {}
        self.orders: dict[int, torch.Tensor | None] = {}

    def start(self, module, args) -> None:
        size = tuple(args[0].shape[-2:])
        if size != self.size:
            geo = self.adapter.geometry(args[0])
            self.layouts, self.size = layer_layouts(geo, self.adapter.num_layers), size
            self.orders = {i: self.order(geo.layer(i)) for i in self.layouts} if self.order else {}

    def hook(self, layer: int):
        def read(module, args, out):
            tokens = self.tokens(out, args)
            lay, order = self.layouts[layer], self.orders.get(layer)
            lay.check(tokens.shape[1], where=f"block of layer {layer}")
            if order is not None:
                tokens = tokens[:, order.to(tokens.device)]
            self.sink.hidden(layer, tokens, layout=lay)

        return read
