"""open_clip image towers: OpenAI-style ViTs (ViT-B-32, ViT-B-16, ViT-L-14, ...) and towers
with a timm trunk (SigLIP, EVA via open_clip's ``TimmModel``).

How the tap works. open_clip's default blocks call ``nn.MultiheadAttention`` with
``need_weights=False``, which in eval runs a fused kernel that no hook can look into. A
tap replaces each ``nn.MultiheadAttention``'s forward for its duration: it projects the input
with ``in_proj_weight`` and ``in_proj_bias`` into q, k and v and hands them to the sink; when
the sink produced the attention output from its probability blocks (one attention pass) the
tap applies ``out_proj`` to it, otherwise the module's own forward (fast path) runs. Custom
blocks (open_clip's own ``Attention``: q/k-norm, scaled cosine) are tapped like timm's, at
their ``F.scaled_dot_product_attention`` call or their ``attn_drop``. Timm-trunk towers hand
everything to the timm adapter's tap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from probekit.adapter import Adapter, Sink
from probekit.adapter_options import AdapterOptions, library_keywords
from probekit.attention import LayerAttention, sdpa_dtype
from probekit.errors import (
    LayoutError,
    UnknownNameError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
    reading_checkpoint,
)
from probekit.inputs.images import per_channel
from probekit.masks import additive_bias
from probekit.tokens import TokenLayout, pair

from ._reference import block_inputs, fed
from ._sdpa_spy import attention_report, tap_blocks, watch_attention
from ._typing import LibraryModule
from .timm import TimmAdapter

__all__ = ["OpenClipAdapter", "OpenClipTimmAdapter"]

_SCHEMAS = ("hf-hub:", "local-dir:")


# -- nn.MultiheadAttention: q and k from in_proj -----------------------------------------------------
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def mha_qk(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, with_v: bool = False) -> LayerAttention:
    """What ``mha``'s softmax sees for this call: q, k ``[B, H, T, d]``, scale and mask bias (and v)."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedArchitectureError("nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported.")
    call = {**dict(zip(_MHA_ARGS, args, strict=False)), **kwargs}  # some positionals, the rest as keywords
    query = call["query"]
    key = call.get("key", query)
    value = call.get("value", key)
    if not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    e, h = mha.embed_dim, mha.num_heads
    w_in, b_in = mha.in_proj_weight, mha.in_proj_bias
    v = None
    if with_v and w_in is not None and query is key is value:  # self-attention: one projection
        q, k, v = F.linear(query, w_in, b_in).chunk(3, dim=-1)
    else:
        w_q = w_in[:e] if w_in is not None else mha.q_proj_weight
        w_k = w_in[e : 2 * e] if w_in is not None else mha.k_proj_weight
        b_q, b_k = (b_in[:e], b_in[e : 2 * e]) if b_in is not None else (None, None)
        q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        if with_v:
            w_v = w_in[2 * e :] if w_in is not None else mha.v_proj_weight
            v = F.linear(value, w_v, b_in[2 * e :] if b_in is not None else None)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(b, t, h, e // h).transpose(1, 2)
    k = k.reshape(b, s, h, e // h).transpose(1, 2)
    if v is not None:
        v = v.reshape(b, s, h, -1).transpose(1, 2)
    bias = None
    if call.get("attn_mask") is not None:
        add = additive_bias(call["attn_mask"], true_means="ignore")
        bias = add.view(b, h, t, s) if add.dim() == 3 else add.view(1, 1, t, s)
    if call.get("key_padding_mask") is not None:
        add = additive_bias(call["key_padding_mask"], true_means="ignore")
        add = add.view(b, 1, 1, s)
        bias = add if bias is None else bias + add
    return LayerAttention(q=q, k=k, scale=(e // h) ** -0.5, bias=bias, v=v, out_dtype=sdpa_dtype(q))


class _Restore:
    """A hook-handle look-alike that gives a module back its class's forward."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _watch_mha(mha: nn.MultiheadAttention, sink: Sink, layer: int):
    """Replace ``mha.forward`` while tapped: report q, k (and v), then the sink's output or the real forward.

    v is handed over only where the module's output is just softmax(q kᵀ) v through
    ``out_proj``: no weights asked for, no dropout, not causal.
    """

    def forward(*args, **kwargs):
        call = {**dict(zip(_MHA_ARGS, args, strict=False)), **kwargs}  # some positionals, the rest as keywords
        fusable = (not call.get("need_weights", True) and not call.get("is_causal", False)
                   and not (mha.training and mha.dropout > 0))
        made = sink.attention(layer, mha_qk(mha, args, kwargs, with_v=fusable))
        if made is None:
            return type(mha).forward(mha, *args, **kwargs)
        b, _, t, _ = made.shape
        out = F.linear(made.transpose(1, 2).reshape(b, t, mha.embed_dim), mha.out_proj.weight, mha.out_proj.bias)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    mha.forward = forward  # type: ignore[method-assign]  # an instance attribute for the tap; _Restore pops it
    return [_Restore(mha)]


def _watch_block(attn: nn.Module, sink: Sink, layer: int) -> list:
    """torch MHA blocks report q/k from their inputs; open_clip ``Attention`` through the SDPA spy."""
    if isinstance(attn, nn.MultiheadAttention):
        return _watch_mha(attn, sink, layer)
    return watch_attention(attn, attention_report(sink, layer), f"layer {layer}")


def _mha_reference(mha: nn.MultiheadAttention, store: dict, layer: int):
    """Hooks that make one MHA call return per-head weights, and keep them."""

    def ask(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep(module, args, out):
        store[layer] = out[1].float()

    return [mha.register_forward_pre_hook(ask, with_kwargs=True), mha.register_forward_hook(keep)]


def _custom_reference(attn: LibraryModule, store: dict, layer: int):
    """Eager softmax of open_clip ``Attention``'s normed q and k, read at ``ln_q``/``ln_k``."""
    seen = {}

    def keep_q(module, args, out):
        seen["q"] = out

    def keep_k(module, args, out):
        q = seen.pop("q").double()
        store[layer] = torch.softmax(q @ out.double().transpose(-1, -2) * attn.scale, dim=-1).float()

    return [attn.ln_q.register_forward_hook(keep_q), attn.ln_k.register_forward_hook(keep_k)]


# -- building ----------------------------------------------------------------------------------------
def _split(name: str) -> tuple[str, str | None]:
    if name.startswith(_SCHEMAS):
        return name, None
    arch, _, tag = name.partition("/")
    return arch, tag or None


def _weights_error(arch: str, tag: str, cause: BaseException) -> WeightsUnavailableError:
    import open_clip
    from huggingface_hub import constants

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    where = cfg.get("hf_hub") or cfg.get("url") or "?"
    return WeightsUnavailableError(
        f"Pretrained weights open_clip:{arch}/{tag} are not on this machine and cannot be downloaded now "
        f"({cause}). open_clip fetches them from {where} into the Hugging Face cache {constants.HF_HUB_CACHE} "
        f"(or ~/.cache/clip for URLs). On a connected machine run `python -c \"import open_clip; "
        f"open_clip.create_model('{arch}', pretrained='{tag}')\"` and copy the cache here (or set HF_HOME), "
        "or pass checkpoint=<local file>, or pretrained=False for random init."
    )


def _check_name(arch: str, tag: str | None, pretrained: bool, checkpoint: str | None) -> None:
    """UnknownNameError (with open_clip's close names) for an architecture or tag it does not list."""
    import open_clip
    from open_clip.pretrained import is_pretrained_cfg

    if arch.startswith(_SCHEMAS):  # hf-hub: and local-dir: configs are found when loading
        return
    if arch not in open_clip.list_models():
        raise UnknownNameError("open_clip architecture", arch, open_clip.list_models(),
                               hint="Specs read open_clip:<arch>/<pretrained tag>, e.g. open_clip:ViT-B-16/openai.")
    if tag is not None and not is_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UnknownNameError("open_clip pretrained tag", f"{arch}/{tag}", [f"{arch}/{t}" for t in tags],
                               hint=f"Tags of {arch}: {', '.join(tags) or 'none'}.")
    if pretrained and checkpoint is None and tag is None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UnknownNameError("open_clip pretrained tag", f"{arch}/", tags,
                               hint=f"Name one: open_clip:{arch}/<tag>, tags {', '.join(tags) or 'none'}; "
                               "or pass pretrained=False.")


def _create(arch: str, tag: str | None, pretrained: bool, checkpoint: str | None, kwargs: dict):
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    _check_name(arch, tag, pretrained, checkpoint)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise WeightsUnavailableError(f"checkpoint={checkpoint!r} is not a file. Give a local open_clip checkpoint.")
    source = checkpoint if checkpoint is not None else (tag if pretrained else None)
    if source is None and tag is not None and not arch.startswith(_SCHEMAS):
        # random init of a tagged model: keep the tag's architecture and preprocessing
        cfg = get_pretrained_cfg(arch, tag)
        if cfg.get("quick_gelu"):
            kwargs.setdefault("force_quick_gelu", True)
        for key, opt in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                         ("resize_mode", "image_resize_mode")):
            if cfg.get(key) is not None:
                kwargs.setdefault(opt, cfg[key])
    if arch.startswith(_SCHEMAS) and not pretrained:
        kwargs["load_weights"] = False
    try:
        with reading_checkpoint(checkpoint):
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source, **kwargs)
    except (RuntimeError, OSError) as exc:
        if source is not None and checkpoint is None and "download" in str(exc).lower():
            raise _weights_error(arch, source, exc) from exc  # source: the tag (no checkpoint)
        raise
    return model, preprocess


class OpenClipOptions(AdapterOptions):
    """open_clip: the common options, ``img_size``, and the keywords of
    ``open_clip.create_model_and_transforms`` and of the CLIP model (model overrides)."""

    img_size: int | tuple[int, int] | None = None
    passthrough_help = ("and keywords of open_clip.create_model_and_transforms or the CLIP model "
                        "(embed_dim, vision_cfg, ...)")

    @classmethod
    def passthrough(cls) -> dict[str, type | None]:
        import open_clip

        return library_keywords(open_clip.create_model_and_transforms, open_clip.CLIP.__init__,
                                open_clip.CustomTextCLIP.__init__,
                                skip=("model_name", "pretrained", "model_kwargs", "self"))


class OpenClipAdapter(Adapter):
    """open_clip image towers. Spec ``open_clip:<arch>/<pretrained tag>`` (``open_clip:ViT-B-16/openai``).

    ``pretrained=False`` builds the architecture at random init (``pretrained=None`` in open_clip);
    extra options go to ``open_clip.create_model`` (``vision_cfg=...`` for tiny test towers).
    """

    name = "open_clip"
    library = "open_clip"
    extra = "open_clip_torch"
    options_schema = OpenClipOptions
    #: a fixed position table: other sizes are set at load (``image_size=``, open_clip resizes it)
    variable_image_size = False

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, name, *, pretrained=True, checkpoint=None, image_size=None, **options) -> OpenClipAdapter:
        """Build the image tower of ``<arch>/<tag>`` with its own preprocessing.

        Args:
            name: ``<arch>/<pretrained tag>``; the tag may be left out with ``pretrained=False``.
            pretrained: load the tag's weights (False: random init).
            checkpoint: a local open_clip checkpoint file (instead of the tag).
            image_size: input size; open_clip resizes position embeddings while loading.
            **options: passed to ``open_clip.create_model`` as model overrides.

        Raises:
            UnknownNameError: unknown architecture or tag (close names listed).
            WeightsUnavailableError: weights not cached and no network.
        """
        arch, tag = _split(name)
        kwargs = dict(options)
        size = kwargs.pop("img_size", None) or image_size
        if size is not None:
            kwargs["force_image_size"] = pair(size)
            if isinstance(kwargs.get("vision_cfg"), dict):  # model overrides win over force_image_size
                kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": pair(size)}
        model, preprocess = _create(arch, tag, bool(pretrained), checkpoint, kwargs)
        return cls._bind(model.visual, preprocess, name=name, pretrained=bool(pretrained) or checkpoint is not None)

    @classmethod
    def _bind(cls, visual: LibraryModule, preprocess, **info) -> OpenClipAdapter:
        ad: OpenClipAdapter
        if _is_timm_tower(visual):
            trunk = TimmAdapter.from_module(visual.trunk)
            ad = OpenClipTimmAdapter(visual, preprocess or _own_preprocess(visual), trunk=trunk,
                                     image_size=trunk.default_image_size, **info)
        elif not _is_vit_tower(visual):
            raise UnsupportedArchitectureError(
                f"The open_clip adapter knows ViT towers (open_clip VisionTransformer) and timm trunks; "
                f"got {type(visual).__name__} (e.g. a ModifiedResNet, which has no token attention)."
            )
        else:
            ad = cls(visual, preprocess or _own_preprocess(visual), image_size=pair(visual.image_size), **info)
        cfg = _preprocess_cfg(visual)  # what open_clip's transform normalises with
        ad.image_mean, ad.image_std = per_channel(cfg.mean, ad.in_chans), per_channel(cfg.std, ad.in_chans)
        return ad

    @classmethod
    def check_spec(cls, name: str, *, pretrained: bool = True, checkpoint: str | None = None, **options: Any) -> None:
        """The architecture and tag against open_clip's lists (no model built)."""
        _check_name(*_split(name), bool(pretrained), checkpoint)

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        visual = getattr(module, "visual", module)
        return _is_vit_tower(visual) or _is_timm_tower(visual)

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> OpenClipAdapter:
        """Bind an open_clip CLIP model (its ``visual``) or a tower itself."""
        visual = getattr(module, "visual", module)
        return cls._bind(visual, None, name=type(module).__name__, **options)

    # -- describing ------------------------------------------------------------------------------
    @property  # read from the tower, never set
    def in_chans(self) -> int:
        return int(getattr(getattr(self.model, "conv1", None), "in_channels", 3))

    @property
    def _tower(self) -> LibraryModule:
        """The bound open_clip ``VisionTransformer``, read by its attributes."""
        return self.model

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self._tower.transformer.resblocks)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        attn: LibraryModule = self.blocks[0].attn
        return int(attn.num_heads)

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        size = tuple(pixel_values.shape[-2:])
        if size != pair(self._tower.image_size):
            raise LayoutError(
                f"This open_clip tower was built for {pair(self._tower.image_size)} inputs and got {size}. "
                f"Load it with image_size={size} (open_clip resizes position embeddings), or resize the images."
            )
        return TokenLayout(1, tuple(self._tower.grid_size), pair(self._tower.patch_size), ("cls",))

    # -- running ---------------------------------------------------------------------------------
    def _tokens_first(self) -> bool:
        return not getattr(self.model.transformer, "batch_first", True)

    @contextmanager
    def tap(self, sink: Sink) -> Iterator[None]:
        with tap_blocks(self.blocks, sink, watch=_watch_block, hidden=_BatchFirst(sink, self._tokens_first())):
            yield

    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """MHA's own per-head weights (``need_weights=True, average_attn_weights=False``).

        Custom blocks (open_clip ``Attention``) have no working unfused path for batched heads, so
        their reference is an eager softmax of the ``ln_q``/``ln_k`` module outputs (scaled-cosine
        blocks: their own softmax output at ``attn_drop``), read by module hooks, not the SDPA spy.
        Each block is fed what it receives in the tower's own fast forward (see ``_reference.py``).
        """
        inputs = block_inputs(self.blocks, lambda: self.model(pixel_values))
        store: dict[int, torch.Tensor] = {}
        handles = []
        for i, block in enumerate(self.blocks):
            attn: LibraryModule = block.attn
            if isinstance(attn, nn.MultiheadAttention):
                handles += _mha_reference(attn, store, i)
            elif attn.logit_scale is not None:
                handles.append(attn.attn_drop.register_forward_hook(
                    lambda m, a, out, i=i: store.__setitem__(i, out.float())))
            else:
                handles += _custom_reference(attn, store, i)
        try:
            with torch.inference_mode(), fed(self.blocks, inputs):
                self.model(pixel_values)
        finally:
            for h in handles:
                h.remove()
        return dict(sorted(store.items()))


class _BatchFirst:
    """Passes hidden states on as ``[B, T, D]`` whatever the tower's token order."""

    def __init__(self, sink: Sink, seq_first: bool):
        self.sink, self.seq_first = sink, seq_first

    def hidden(self, layer: int, tokens: torch.Tensor) -> None:
        self.sink.hidden(layer, tokens.transpose(0, 1) if self.seq_first else tokens)


class OpenClipTimmAdapter(OpenClipAdapter):
    """An open_clip tower whose trunk is a timm model (SigLIP, EVA): the timm tap does the work,
    the whole tower (trunk and projection head) runs as open_clip runs it."""

    def __init__(self, model: nn.Module, preprocess: Any = None, *, trunk: TimmAdapter, **info: Any):
        super().__init__(model, preprocess, **info)
        self.trunk = trunk
        self.info.setdefault("family", trunk.info.get("family"))

    global_attention = property(lambda self: self.trunk.global_attention)
    in_chans = property(lambda self: self.trunk.in_chans)
    variable_image_size = property(lambda self: self.trunk.variable_image_size)
    blocks = property(lambda self: self.trunk.blocks)
    num_layers = property(lambda self: self.trunk.num_layers)
    num_heads = property(lambda self: self.trunk.num_heads)

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        return self.trunk.layout(pixel_values)

    def tap(self, sink: Sink):
        return self.trunk.tap(sink)

    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.trunk.reference_attention(pixel_values)


def _preprocess_cfg(visual: LibraryModule):
    """The tower's ``preprocess_cfg`` (set by create_model; open_clip's defaults otherwise) as a PreprocessCfg."""
    from open_clip.transform import PreprocessCfg

    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    cfg.setdefault("size", pair(visual.image_size))
    return PreprocessCfg(**cfg)


def _own_preprocess(visual: LibraryModule):
    """open_clip's inference transform from the tower's ``preprocess_cfg`` (set by create_model)."""
    from open_clip.transform import image_transform_v2

    return image_transform_v2(_preprocess_cfg(visual), is_train=False)


def _is_vit_tower(visual: nn.Module) -> bool:
    return type(visual).__module__.startswith("open_clip") and type(visual).__name__ == "VisionTransformer"


def _is_timm_tower(visual: nn.Module) -> bool:
    return type(visual).__name__ == "TimmModel" and TimmAdapter.can_wrap(getattr(visual, "trunk", nn.Identity()))
