"""The probekit adapter for :class:`~probekit_tinyvit.model.TinyViT` (spec prefix ``tinyvit:``).

It is the worked adapter of probekit's plugin guide (docs/plugins.md). What it shows:

- ``tap``: the model runs its own fused attention at full speed; a forward hook on each layer's
  ``to_qkv`` projection hands the engine q and k with the scale, and the engine recomputes the
  probabilities in float32, a block of query rows at a time.
- hidden states: the residual additions happen in the transformer's loop, so no module returns a
  layer's output; the input of the next layer (and of the final norm) is that output.
- ``reference_attention``: the same model's explicit softmax (``fused = False``), an independent
  path that proves the tap; ``probekit.testing.check_adapter`` compares the two.
- ``variable_image_size = False``: the position table is fixed at 28x28.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from probekit import Adapter, LayoutError, TokenLayout, UnknownNameError, WeightsUnavailableError
from probekit.adapter import Sink, wants
from probekit.attention import LayerAttention
from probekit.adapter_options import AdapterOptions, library_keywords

from .model import TinyViT

#: the architectures this backend builds: name -> TinyViT keyword arguments (data, not if-chains)
ARCHS: dict[str, dict[str, Any]] = {
    "tinyvit-s4": dict(image_size=28, patch_size=4, dim=64, depth=4, heads=4, dim_head=16, mlp_dim=128),
    "tinyvit-t4": dict(image_size=28, patch_size=4, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64),
}
MEAN, STD = 0.1307, 0.3081  # MNIST statistics, what the model would be trained with


def preprocess(size: int):
    """PIL image -> normalised ``[1, size, size]`` tensor (torchvision does the work)."""
    from torchvision import transforms as T

    return T.Compose([T.Grayscale(1), T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([MEAN], [STD])])


class TinyVitOptions(AdapterOptions):
    """What ``pk.load("tinyvit:...", **options)`` takes: the common options, and TinyViT's own
    keywords (``depth=1`` for a smaller model), checked before anything is built."""

    passthrough_help = "and keywords of TinyViT (dim, depth, heads, dim_head, mlp_dim, ...)"

    @classmethod
    def passthrough(cls) -> dict[str, type | None]:
        return library_keywords(TinyViT.__init__, skip=("self", "image_size"))


class TinyVitAdapter(Adapter):
    """TinyViT models: ``pk.load("tinyvit:tinyvit-s4", pretrained=False)`` or ``pk.wrap(TinyViT())``."""

    name = "tinyvit"
    library = "torch"
    extra = "probekit-tinyvit"
    variable_image_size = False  # a fixed 50-entry position table: 28x28 inputs only
    in_chans = 1  # grayscale: probekit converts images to one channel
    image_mean, image_std = (MEAN,), (STD,)  # what preprocess normalises with; probekit.testing checks it
    options_schema = TinyVitOptions  # checked in run files, on the command line and by pk.load

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, name: str, *, pretrained: bool = True, checkpoint: str | None = None,
                  image_size=None, **options: Any) -> "TinyVitAdapter":
        if name not in ARCHS:
            raise UnknownNameError("tinyvit model", name, ARCHS, hint=f"Known: {', '.join(ARCHS)}.")
        kwargs = {**ARCHS[name], **options}
        if image_size is not None and _pair(image_size) != (model_size := kwargs["image_size"],) * 2:
            raise LayoutError(f"tinyvit models have a fixed {model_size}x{model_size} position table; got image_size={image_size}. "
                              "Leave image_size out.")
        model = TinyViT(**kwargs)
        if checkpoint is not None:
            model.load_state_dict(torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True))
        elif pretrained:
            raise WeightsUnavailableError(
                f"No pretrained weights ship with the example model {name!r}. Pass checkpoint=<file saved "
                "with torch.save(model.state_dict())>, or pretrained=False for random init."
            )
        return cls(model, preprocess(model.image_size), image_size=(model.image_size,) * 2,
                   checkpoint=None if checkpoint is None else str(checkpoint))

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, TinyViT)

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> "TinyVitAdapter":
        return cls(module, preprocess(module.image_size), image_size=(module.image_size,) * 2)

    # -- describing ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.model.transformer.layers)

    @property
    def num_heads(self) -> int:
        return self.model.transformer.layers[0][0].heads

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        p = self.model.patch_size
        h, w = pixel_values.shape[-2:]
        if h % p or w % p:
            raise LayoutError(f"tinyvit needs sides divisible by its {p} px patches; got {h}x{w}.")
        return TokenLayout(num_prefix=1, grid=(h // p, w // p), patch_size=(p, p), prefix_kinds=("cls",))

    # -- running -------------------------------------------------------------------------------
    @contextmanager
    def tap(self, sink: Sink) -> Iterator[None]:
        layers = self.model.transformer.layers
        handles = []
        try:
            for i, (attn, _) in enumerate(layers):
                if not wants(sink, i):
                    continue
                if sink.wants_attention:
                    handles.append(attn.to_qkv.register_forward_hook(_qk_hook(sink, i, attn)))
                if sink.wants_hidden:  # layer i's output is the input of what comes after it
                    after = layers[i + 1][0] if i + 1 < len(layers) else self.model.transformer.norm
                    handles.append(after.register_forward_pre_hook(_hidden_hook(sink, i)))
            yield
        finally:
            for h in handles:
                h.remove()

    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """The model's own explicit softmax (``fused = False``), read from each ``attend`` module."""
        out, handles = {}, []
        attns = [attn for attn, _ in self.model.transformer.layers]
        try:
            for i, attn in enumerate(attns):
                attn.fused = False
                handles.append(attn.attend.register_forward_hook(
                    lambda m, args, probs, i=i: out.__setitem__(i, probs.detach().float())))
            with torch.inference_mode():
                self.model(pixel_values)
        finally:
            for attn in attns:
                attn.fused = True
            for h in handles:
                h.remove()
        return out


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def _qk_hook(sink: Sink, layer: int, attn: nn.Module):
    def hook(module, args, qkv):
        q, k, _ = attn.split_heads(qkv)
        sink.attention(layer, LayerAttention(q=q, k=k, scale=attn.scale))

    return hook


def _hidden_hook(sink: Sink, layer: int):
    def hook(module, args):
        sink.hidden(layer, args[0])

    return hook
