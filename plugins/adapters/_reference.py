"""Reference attention from the same layer inputs as the tap.

A library's reference path (eager softmax, ``need_weights=True``, timm with fused attention
off) computes each layer's output slightly differently from the fast path the tap watches
(float32 rounding of a fused kernel against a matmul and a softmax). Through depth those
differences compound: at layer 1 of a randomized 12-layer ViT-S/16 the two paths' attention
already differs by 2e-5, so comparing whole forward passes measures that drift, not the tap.
Here the fast model's forward records what each block receives, and the reference model's
blocks are fed exactly that: layer ``i``'s reference attention is the library's own attention
of the same input, whatever the reference path did to the layers before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["block_inputs", "fed"]


def _first_tensor(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor]:
    """Where a block's input tokens are: the first positional tensor, else the first tensor keyword."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            return k, a
    raise TypeError("a transformer block was called without a tensor argument")


def block_inputs(blocks: Sequence[nn.Module], run: Callable[[], object]) -> list[torch.Tensor]:
    """The tokens each block receives while ``run()`` runs the model's own forward."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, kwargs):
            seen[i] = _first_tensor(args, kwargs)[1].detach().clone()

        return hook

    handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(blocks)) if i not in seen]
    if missing:
        raise RuntimeError(f"blocks {missing} were not called by the model's forward")
    return [seen[i] for i in range(len(blocks))]


@contextmanager
def fed(blocks: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> Iterator[None]:
    """While active, block ``i`` receives ``inputs[i]`` in place of what the layers before produced."""

    def feed(i):
        def hook(module, args, kwargs):
            where, _ = _first_tensor(args, kwargs)
            if isinstance(where, int):
                args = (*args[:where], inputs[i], *args[where + 1:])
            else:
                kwargs = {**kwargs, where: inputs[i]}
            return args, kwargs

        return hook

    handles = [b.register_forward_pre_hook(feed(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
