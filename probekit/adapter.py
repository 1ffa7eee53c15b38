"""The adapter contract, and ProbedModel: an adapter bound to a loaded model.

An :class:`Adapter` knows one library's ViTs: how to build them from a spec (with their own
preprocessing), the token layout of an input, and how to tap each layer's attention while
the model runs its own fast path. A tap calls the engine's :class:`Sink` once per layer,
during the forward pass, so nothing of a layer outlives it.

Capabilities are class constants that ``probekit.testing`` reads as scikit-learn reads
estimator tags.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from probekit.adapter_options import AdapterOptions
from probekit.attention import LayerAttention
from probekit.tokens import TokenLayout

if TYPE_CHECKING:
    from probekit.geometry import ModelGeometry

__all__ = ["Adapter", "ProbedModel", "Sink", "CollectSink", "eval_mode"]


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run ``model`` in eval mode (dropout, drop-path and batch-norm statistics off), then give
    every submodule back the mode it had, also when the run raises.

    Probing measures the model, not one random draw of its dropout: a module a caller left in
    train mode would give different values on every call. The caller's modes, mixed ones
    included (a frozen block in a training model), are theirs to keep. Anything that is not an
    ``nn.Module`` (an ONNX session) has no mode and is left alone.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    if not _any_training(model):  # in eval mode throughout (a loaded model): nothing to set or give back
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _any_training(model: nn.Module) -> bool:
    """Whether ``model`` or any submodule is in train mode. Why not ``model.modules()``: its
    generators and names cost ~1 ms on a ViT-S, a visible share of a small probe (issue 25)."""
    stack: list[nn.Module | None] = [model]
    pop, extend = stack.pop, stack.extend  # no generator per module: half the time (~40 us on a ViT-S)
    while stack:
        m = pop()
        if m is None:  # a child slot set to None
            continue
        if m.training:
            return True
        extend(m._modules.values())
    return False


class Sink(Protocol):
    """What a tap reports to while the model runs.

    ``layers``: the layer indices wanted (None: all). A tap calls :meth:`attention` for each
    wanted layer when ``wants_attention``, and :meth:`hidden` with the block's output tokens
    ``[B, T, D]`` when ``wants_hidden``, and, where a block's tokens differ from the input's
    (staged models), that block's own ``layout`` (default: the input layout).
    """

    layers: frozenset[int] | None
    wants_attention: bool
    wants_hidden: bool

    def attention(self, layer: int, attn: LayerAttention) -> torch.Tensor | None:
        """Take one layer's record; return its attention output ``[B, H, T, dv]`` where the sink made it
        from ``attn.v`` (the tap hands it to the model instead of running its own kernel), else None."""
        ...

    def hidden(self, layer: int, tokens: torch.Tensor, layout: TokenLayout | None = None) -> None: ...


class CollectSink:
    """A sink that keeps what it is given (small inputs, tests, ``ProbedModel.attention``)."""

    def __init__(self, layers=None, attention: bool = True, hidden: bool = False):
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        self.wants_attention, self.wants_hidden = attention, hidden
        self.probs: dict[int, torch.Tensor] = {}
        self.hiddens: dict[int, torch.Tensor] = {}
        self.hidden_layouts: dict[int, TokenLayout] = {}  # only the layers whose tap gave one

    def attention(self, layer: int, attn: LayerAttention) -> None:
        self.probs[layer] = attn.probs()
        return None

    def hidden(self, layer: int, tokens: torch.Tensor, layout: TokenLayout | None = None) -> None:
        self.hiddens[layer] = tokens.detach().clone()
        if layout is not None:
            self.hidden_layouts[layer] = layout


def wants(sink: Sink, layer: int) -> bool:
    """Whether ``sink`` asked for ``layer``."""
    return sink.layers is None or layer in sink.layers


class Adapter(ABC):
    """One library's ViTs, bound to one loaded model.

    Subclasses set ``name`` (the spec prefix, e.g. ``"timm"``), ``library`` and ``extra``
    (what to ``pip install`` when the library is missing), and implement the abstract methods.
    """

    name: ClassVar[str] = ""
    library: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    # capabilities: class constants that an instance may override for the model it holds (not ClassVar)
    #: every query attends to every token (False: windowed, e.g. Swin); MAD refuses False
    global_attention: bool = True
    #: the tap can report each block's output tokens (hidden-state metrics)
    provides_hidden: bool = True
    #: the bound model runs inputs of other sizes than its native one (False: a fixed position
    #: table or a fixed ONNX input; an instance may override it); probekit.testing reads it
    variable_image_size: bool = True
    #: the options :meth:`from_spec` takes, checked by type before any model loads
    #: (:mod:`probekit.adapter_options`); subclass :class:`~probekit.adapter_options.AdapterOptions` to add yours
    options_schema: ClassVar[type[AdapterOptions]] = AdapterOptions
    if TYPE_CHECKING:  # read-only to readers: a subclass declares it, sets it, or reads its model in a property
        @property
        def in_chans(self) -> int: ...
    else:
        #: input channels (3: RGB; 1: grayscale); images are converted to this many before
        #: ``preprocess``. Built-in adapters read it from the model (an instance attribute).
        in_chans = 3
    #: the per-channel mean and std (of pixels in [0, 1]) that ``preprocess`` normalises with: the statistics
    #: the model was trained with (0 and 1 for raw pixels). ``probekit.testing`` checks ``preprocess`` against
    #: them (a constant image at the mean must come out as 0); built-in adapters read them from the library.
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    #: conformance checks that do not apply, ``{check name: why}`` (an instance may override it).
    #: ``probekit.testing.check_adapter`` fails a check that cannot run unless it is listed here.
    not_applicable_checks: dict[str, str] = {}

    def __init__(self, model: nn.Module, preprocess: Any = None, **info: Any):
        self.model = model.eval()
        self.preprocess = preprocess
        self.info: dict[str, Any] = dict(info)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_spec(
        cls,
        name: str,
        *,
        pretrained: bool = True,
        checkpoint: str | None = None,
        image_size: int | tuple[int, int] | None = None,
        **options: Any,
    ) -> Adapter:
        """Build the model named ``name`` (the part of the spec after ``prefix:``)."""

    @classmethod
    def check_spec(cls, name: str, **options: Any) -> None:
        """Refuse a ``name`` (the spec after ``prefix:``) that :meth:`from_spec` could not build.

        The run-file check (:func:`probekit.runs.config.check_run`, so ``probekit run`` and ``probekit
        compare`` too) calls it for every model before the first one loads, so a typo in the
        fifth model fails in a second, not after four models ran. Check against the library's own
        list of names, cheaply: build no model, read no weights. Raise
        :class:`~probekit.errors.UnknownNameError` with the library's names (it lists the close
        ones). The default accepts every name (the load then says what is wrong).
        """
        return None

    @classmethod
    def weight_files(cls, name: str, **options: Any) -> list[Path]:
        """The local files :meth:`from_spec` would read for ``name`` and ``options``.

        A cached part is keyed on their content, so a file changed in place (a checkpoint
        trained further, a re-exported graph, a refreshed Hugging Face snapshot) is never
        served the old file's numbers. Called before any model loads: list the files, do not
        load them. The default is the ``checkpoint=`` file when one is given; an adapter that
        reads other local files (a graph, a model directory, a hub cache) adds them.
        """
        ckpt = options.get("checkpoint")
        return [] if ckpt is None else [Path(str(ckpt)).expanduser()]

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        """Whether this adapter understands ``module`` (for :func:`probekit.wrap`)."""
        return False

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> Adapter:
        """Bind to a user's own module."""
        raise NotImplementedError(f"{cls.__name__} cannot wrap modules")

    # -- describing ----------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def num_heads(self) -> int: ...

    @abstractmethod
    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        """The token layout the model produces for ``pixel_values`` ``[B, C, H, W]``."""

    def geometry(self, pixel_values: torch.Tensor) -> ModelGeometry:
        """Each layer's attention geometry for ``pixel_values`` (:mod:`probekit.geometry`).

        Default: every layer global over :meth:`layout`. Adapters of windowed, pooled, staged or
        class-attention models return per-layer :class:`~probekit.geometry.LayerGeometry` s.
        """
        from probekit.geometry import ModelGeometry

        return ModelGeometry(self.layout(pixel_values), num_layers=self.num_layers)

    def hidden_layouts(self, pixel_values: torch.Tensor) -> dict[int, TokenLayout]:
        """The layout of each block's output tokens (what hidden-state metrics read) for ``pixel_values``.

        Default: the input layout at every layer. Staged models (patch merging, pooled queries, a
        class token that joins late) override it; their taps hand each layer's to ``Sink.hidden``.
        """
        lay = self.layout(pixel_values)
        return {i: lay for i in range(self.num_layers)}

    @property
    def default_image_size(self) -> tuple[int, int]:
        """The model's native input size ``(H, W)``."""
        return tuple(self.info.get("image_size", (224, 224)))

    # -- running -------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> Any:
        """The model's own forward pass (what a tap watches). Callers run it inside :meth:`evaluating`."""
        return self.model(pixel_values)

    def evaluating(self):
        """A context in which the model runs in eval mode; the caller's modes come back after it
        (:func:`eval_mode`). Every probekit entry point that runs a model runs it inside one."""
        return eval_mode(self.model)

    @abstractmethod
    @contextmanager
    def tap(self, sink: Sink) -> Iterator[None]:
        """While active, every :meth:`forward` reports each wanted layer to ``sink``."""

    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """The library's own attention probabilities ``{layer: [B, H, T, T]}`` (conformance)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference attention")

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def to(self, device=None, dtype=None) -> Adapter:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


class ProbedModel:
    """An adapter bound to a loaded model, with its spec and metadata: what users hold.

    >>> import probekit as pk                                      # doctest: +SKIP
    >>> pm = pk.load("timm:vit_small_patch16_224", pretrained=False)  # doctest: +SKIP
    >>> pm.attention(torch.randn(1, 3, 224, 224))[0].shape          # doctest: +SKIP
    torch.Size([1, 6, 197, 197])
    """

    def __init__(self, adapter: Adapter, spec: str, label: str | None = None, **meta: Any):
        self.adapter = adapter
        self.spec = spec
        self.label = label or spec
        self.meta = dict(meta)

    # delegation
    model = property(lambda self: self.adapter.model)
    preprocess = property(lambda self: self.adapter.preprocess)
    num_layers = property(lambda self: self.adapter.num_layers)
    num_heads = property(lambda self: self.adapter.num_heads)
    device = property(lambda self: self.adapter.device)

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        return self.adapter.layout(pixel_values)

    def geometry(self, pixel_values: torch.Tensor):
        """Each layer's attention geometry (:class:`~probekit.geometry.ModelGeometry`)."""
        return self.adapter.geometry(pixel_values)

    def to(self, device=None, dtype=None) -> ProbedModel:
        self.adapter.to(device, dtype)
        return self

    def example_input(self, batch: int = 1, image_size=None, seed: int = 0) -> torch.Tensor:
        """A seeded random input of the model's native (or the given) size."""
        h, w = image_size or self.adapter.default_image_size
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.adapter.in_chans, h, w, generator=g).to(self.device)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> Any:
        """The model's output, in eval mode (see :func:`eval_mode`)."""
        with self.adapter.evaluating():
            return self.adapter.forward(pixel_values)

    @torch.inference_mode()
    def attention(self, pixel_values: torch.Tensor, layers=None) -> dict[int, torch.Tensor]:
        """Per-layer attention probabilities ``{layer: [B, H, T, T]}`` in float32 (small inputs),
        in eval mode (see :func:`eval_mode`).

        For image sets use :func:`probekit.engine.probe`, which never holds more than one layer.
        """
        sink = CollectSink(layers)
        with self.adapter.evaluating(), self.adapter.tap(sink):
            self.adapter.forward(pixel_values)
        return dict(sorted(sink.probs.items()))

    @torch.inference_mode()
    def hidden_states(self, pixel_values: torch.Tensor, layers=None) -> dict[int, torch.Tensor]:
        """Per-layer output tokens ``{layer: [B, T, D]}``, in eval mode."""
        sink = CollectSink(layers, attention=False, hidden=True)
        with self.adapter.evaluating(), self.adapter.tap(sink):
            self.adapter.forward(pixel_values)
        return dict(sorted(sink.hiddens.items()))

    def describe(self, pixel_values: torch.Tensor | None = None) -> dict[str, Any]:
        """What ``probekit inspect`` prints: layers, heads, layout, parameters, metadata."""
        x = pixel_values if pixel_values is not None else self.example_input()
        lay = self.layout(x)
        info = {
            "spec": self.spec,
            "label": self.label,
            "adapter": self.adapter.name,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "prefix_tokens": lay.num_prefix,
            "prefix_kinds": list(lay.prefix_kinds),
            "grid": list(lay.grid),
            "patch_size": list(lay.patch_size),
            "image_size": list(x.shape[-2:]),
            "tokens": lay.num_tokens,
            "parameters": self.adapter.parameters_count(),
            "global_attention": self.adapter.global_attention,
        }
        # alias metadata (family, training kind, weights) never overrides what was measured
        extra = {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool)) and k not in info}
        return {**info, **extra}

    def __repr__(self) -> str:
        return (f"ProbedModel({self.spec!r}, adapter={self.adapter.name!r}, layers={self.num_layers}, "
                f"heads={self.num_heads})")
