"""timm ViTs: VisionTransformer (ViT, DeiT, DINO, DINOv2 with registers, CLIP and SigLIP
towers, MAE encoders), the distilled DeiT, EVA/EVA-02 and BEiT; and, layer by layer with their
geometry (:mod:`probekit.geometry`, families in ``_timm_geometry.py``), Swin/SwinV2 windows, the
SAM/ViTDet encoder's windowed and global blocks, CaiT's class attention, PiT's stages, MViTv2's
pooled keys, Twins' padded windows and sub-sampled keys and XCiT's class-attention layers.

How the tap works. timm fixes ``fused_attn`` at build time and, when fused, never calls the
modules a hook could watch; EVA and BEiT project q/k/v with ``F.linear`` and add rotary
embeddings or a relative-position table after any module boundary. Rather than re-implement
each family's attention, the tap watches the one call every fused path makes:
``F.scaled_dot_product_attention``. While a watched attention module runs, a thread-local
spy on that function hands the sink exactly what the softmax sees (q and k after q/k-norm and
rotary embedding, the scale, the mask or relative-position bias as an additive bias) and then
lets the original kernel run. A module running unfused (``fused_attn=False``) never calls
SDPA; its ``attn_drop`` input-output is then the probabilities, and the tap passes those on.
Calls made outside a watched module (e.g. SigLIP's attention-pool head) pass straight through.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probekit.adapter import Adapter, Sink
from probekit.adapter_options import AdapterOptions, library_keywords
from probekit.errors import (
    LayoutError,
    UnknownNameError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
    reading_checkpoint,
)
from probekit.geometry import ModelGeometry
from probekit.inputs.images import per_channel
from probekit.tokens import TokenLayout, pair

from ._hiera_geometry import fold_windows, units_first
from ._reference import block_inputs, fed
from ._sdpa_spy import attention_report, tap_blocks, watch_attention
from ._staged_hidden import BlockOutputs, layer_layouts
from ._timm_geometry import (
    GEOMETRIES,
    logits_hook,
    regrouped,
    softmax_reference,
    watch_module_softmax,
    watch_sdpa_or_softmax,
    watch_softmax,
)
from ._typing import LibraryModule

__all__ = ["TimmAdapter", "TimmWindowedAdapter", "FAMILIES"]


# -- families: data, not if-chains ---------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One kind of timm model the adapter knows.

    Args:
        name: short family name (recorded in ``info["family"]``).
        modules: timm model modules whose entrypoints build this family (``timm.models.<module>``).
        classes: model class names (matched along the MRO, so subclasses are understood).
        blocks: attribute holding the transformer blocks, in order.
        dynamic_size: accepts ``dynamic_img_size=True`` (any input size, position embeddings
            resampled per forward); False: the size is fixed when building (``image_size=``).
        global_attention: every query sees every token (False: windowed, e.g. Swin).
    """

    name: str
    modules: tuple[str, ...]
    classes: tuple[str, ...]
    blocks: str = "blocks"
    dynamic_size: bool = True
    global_attention: bool = True


FAMILIES: tuple[Family, ...] = (
    Family("deit-distilled", ("deit",), ("VisionTransformerDistilled",)),
    Family("vit", ("vision_transformer", "deit"), ("VisionTransformer",)),
    Family("eva", ("eva",), ("Eva",)),
    Family("beit", ("beit",), ("Beit",), dynamic_size=False),
    Family("swin", ("swin_transformer", "swin_transformer_v2"), ("SwinTransformer", "SwinTransformerV2"),
           blocks="layers", dynamic_size=False, global_attention=False),
    Family("sam", ("vision_transformer_sam",), ("VisionTransformerSAM",), dynamic_size=False,
           global_attention=False),
    Family("cait", ("cait",), ("Cait",), dynamic_size=False, global_attention=False),
    Family("xcit", ("xcit",), ("Xcit",), dynamic_size=False, global_attention=False),
    Family("pit", ("pit",), ("PoolingVisionTransformer",), blocks="transformers", dynamic_size=False,
           global_attention=False),
    Family("twins", ("twins",), ("Twins",), dynamic_size=False, global_attention=False),
    Family("mvitv2", ("mvitv2",), ("MultiScaleVit",), blocks="stages", dynamic_size=False, global_attention=False),
    Family("hiera", ("hiera",), ("Hiera",), dynamic_size=False, global_attention=False),
)


def family_of(module: nn.Module) -> Family | None:
    """The family of a timm model instance (first match along its class's MRO)."""
    for klass in type(module).__mro__:
        if not klass.__module__.startswith("timm."):
            continue
        for fam in FAMILIES:
            if klass.__name__ in fam.classes:
                return fam
    return None


def _family_of_arch(arch: str) -> Family | None:
    import timm

    module = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    return next((f for f in FAMILIES if module in f.modules), None)



class TimmOptions(AdapterOptions):
    """timm: the common options, ``img_size`` (as timm spells ``image_size``), and keyword
    arguments of ``timm.create_model`` and of the model classes the adapter knows."""

    img_size: int | tuple[int, int] | None = None
    passthrough_help = "and keyword arguments of the timm model class (embed_dim, depth, num_heads, ...)"

    @classmethod
    def passthrough(cls) -> dict[str, type | None]:
        import timm
        from timm import models

        classes = [getattr(getattr(models, m), c) for f in FAMILIES for m in f.modules for c in f.classes
                   if hasattr(getattr(models, m, None), c)]
        return library_keywords(timm.create_model, *(c.__init__ for c in classes),
                                skip=("model_name", "pretrained", "kwargs", "self"))


# -- building helpers ----------------------------------------------------------------------------
def _weights_error(name: str, cause: BaseException) -> WeightsUnavailableError:
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) or "(no Hugging Face repo; URL " + str(getattr(cfg, "url", "?")) + ")"
    return WeightsUnavailableError(
        f"Pretrained weights for timm model {name!r} are not on this machine and cannot be downloaded "
        f"now ({type(cause).__name__}). timm looks for them in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} (repo {repo}) or torch hub's {torch.hub.get_dir()}/checkpoints. On a "
        f"connected machine run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
        "and copy that cache directory here (or set HF_HOME), or pass checkpoint=<local file>, or "
        "pretrained=False for random init."
    )


def _check_name(name: str) -> str:
    """The architecture of ``name`` (``arch[.tag]``), or UnknownNameError with timm's close names."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise UnknownNameError(
            "timm model", name, timm.list_models(), hint="List them with timm.list_models('*vit*')."
        )
    if tag:
        try:
            get_pretrained_cfg(name)
        except RuntimeError:  # "Invalid pretrained tag": timm refuses it even for random init
            tags = timm.list_pretrained(f"{arch}.*")
            raise UnknownNameError("timm pretrained tag", name, tags,
                                   hint=f"Tags of {arch}: {', '.join(tags) or 'none'}.") from None
    return arch


def _create(name: str, pretrained: bool, checkpoint: str | None, kwargs: dict) -> nn.Module:
    import timm

    arch = _check_name(name)
    fam = _family_of_arch(arch)
    if fam is not None and fam.dynamic_size:
        kwargs.setdefault("dynamic_img_size", True)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise WeightsUnavailableError(f"checkpoint={checkpoint!r} is not a file. Give a local weights file.")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
        pretrained = True
    try:
        with reading_checkpoint(checkpoint):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Invalid pretrained tag" in str(exc):
            tags = timm.list_pretrained(f"{arch}.*")
            hint = f"Tags of {arch}: {', '.join(tags) or 'none'}."
            raise UnknownNameError("timm pretrained tag", name, tags, hint=hint) from None
        raise
    except (OSError, ConnectionError) as exc:
        if checkpoint is None and pretrained:
            raise _weights_error(name, exc) from exc
        raise


def _preprocess(model: nn.Module, image_size: tuple[int, int]):
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    chans = _in_chans(model)
    cfg["input_size"] = (chans, *image_size)
    cfg["mean"], cfg["std"] = _stats(model)
    return create_transform(**cfg, is_training=False)


def _stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model was trained with, per input channel (its pretrained_cfg's, resolved by timm)."""
    from timm.data import resolve_data_config

    cfg, chans = resolve_data_config(model=model), _in_chans(model)
    return per_channel(cfg["mean"], chans), per_channel(cfg["std"], chans)


def _in_chans(model: nn.Module) -> int:
    """Input channels of the patch embedding's convolution (else the model's ``in_chans``, else 3)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return int(getattr(proj, "in_channels", getattr(model, "in_chans", 3)))


# -- the adapter -----------------------------------------------------------------------------------
class TimmAdapter(Adapter):
    """timm's global-attention ViTs. Spec ``timm:<model name>[.<pretrained tag>]``.

    >>> import probekit as pk                                                 # doctest: +SKIP
    >>> pm = pk.load("timm:vit_small_patch14_reg4_dinov2", pretrained=False)  # doctest: +SKIP
    >>> pm.layout(pm.example_input()).prefix_kinds                           # doctest: +SKIP
    ('cls', 'reg', 'reg', 'reg', 'reg')
    """

    name = "timm"
    library = "timm"
    extra = "timm"
    options_schema = TimmOptions
    in_chans: int  # read from the model's patch embedding in __init__

    def __init__(self, model: nn.Module, preprocess: Any = None, **info: Any):
        super().__init__(model, preprocess, **info)
        family = family_of(model)
        if family is None:
            raise UnsupportedArchitectureError(
                f"The timm adapter does not understand {type(model).__name__}; it knows "
                f"{', '.join(c for f in FAMILIES for c in f.classes)}."
            )
        self.family = family
        self.info.setdefault("family", family.name)
        self.in_chans = _in_chans(model)
        self.image_mean, self.image_std = _stats(model)  # what _preprocess normalises with
        # dynamic_img_size models resample position embeddings per forward; others are fixed
        self.variable_image_size = bool(getattr(model, "dynamic_img_size", False))

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, name, *, pretrained=True, checkpoint=None, image_size=None, **options) -> TimmAdapter:
        """Build ``name`` with timm; extra ``options`` go to ``timm.create_model``.

        Args:
            name: a timm model name, optionally with a pretrained tag (``vit_base_patch16_224.dino``).
            pretrained: load the tag's weights (False: random init, a control).
            checkpoint: a local weights file (converted by timm's own checkpoint filter).
            image_size: native input size (``img_size`` is accepted too); position embeddings are
                resampled by timm.
            **options: passed to ``timm.create_model`` (``embed_dim=32, depth=2`` for tiny models).

        Raises:
            UnknownNameError: unknown model name or pretrained tag (close names listed).
            WeightsUnavailableError: weights not cached and no network.
            UnsupportedArchitectureError: a timm model that is not a ViT this adapter knows.
        """
        kwargs = dict(options)
        size = kwargs.pop("img_size", None) or image_size
        if size is not None:
            kwargs["img_size"] = pair(size)
        model = _create(name, bool(pretrained), checkpoint, kwargs)
        return cls._bind(model, name=name, pretrained=bool(pretrained) or checkpoint is not None)

    @classmethod
    def check_spec(cls, name: str, **options: Any) -> None:
        """``name`` and its pretrained tag against timm's registry (no model built)."""
        _check_name(name)

    @classmethod
    def weight_files(cls, name: str, *, pretrained: bool = True, **options: Any) -> list[Path]:
        """A ``checkpoint=`` file, or the pretrained tag's files in the Hugging Face cache."""
        files = super().weight_files(name, **options)
        if files or not pretrained:
            return files
        from timm.models import get_pretrained_cfg

        from ._hf_loading import local_model_files

        try:
            repo = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
        except Exception:  # an unknown name or tag: the load says which
            return []
        return local_model_files(repo) if repo else []

    @classmethod
    def _bind(cls, model: LibraryModule, **info: Any) -> TimmAdapter:
        fam = family_of(model)
        if fam is None:
            raise UnsupportedArchitectureError(
                f"The timm adapter knows ViT-style models ({', '.join(c for f in FAMILIES for c in f.classes)}); "
                f"got a {type(model).__name__}, which has no token attention to probe."
            )
        klass = TimmAdapter if fam.global_attention else TimmWindowedAdapter
        size = pair(model.patch_embed.img_size) if fam.global_attention else GEOMETRIES[fam.name].image_size(model)
        return klass(model, _preprocess(model, size), image_size=size, **info)

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        return family_of(module) is not None

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> TimmAdapter:
        """Bind a timm model instance (e.g. a fine-tuned one); preprocessing from its pretrained_cfg."""
        return cls._bind(module, name=type(module).__name__, **options)

    # -- describing ------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return list(getattr(self.model, self.family.blocks))

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        attn: LibraryModule = self.blocks[0].attn
        return int(attn.num_heads)

    def _prefix_kinds(self) -> tuple[str, ...]:
        n = int(getattr(self.model, "num_prefix_tokens", 0))
        kinds = ["cls"] * (getattr(self.model, "cls_token", None) is not None)
        kinds += ["dist"] * (getattr(self.model, "dist_token", None) is not None)
        return tuple(kinds + ["reg"] * (n - len(kinds)))

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        pe: LibraryModule = self.model.patch_embed
        size = tuple(pixel_values.shape[-2:])
        if not getattr(self.model, "dynamic_img_size", False) and size != pair(pe.img_size):
            raise LayoutError(
                f"This {type(self.model).__name__} was built for {pair(pe.img_size)} inputs and got {size}. "
                f"Load it with image_size={size} (timm resamples position tables), or resize the images."
            )
        patch = pair(pe.patch_size)
        if not getattr(pe, "dynamic_img_pad", False) and (size[0] % patch[0] or size[1] % patch[1]):
            raise LayoutError(
                f"timm needs input sizes divisible by the patch size {patch}; got {size}. Resize or crop "
                "the images, or load with dynamic_img_pad=True (timm then pads the border patches)."
            )
        kinds = self._prefix_kinds()
        return TokenLayout(len(kinds), pe.dynamic_feat_size(size), patch, kinds)

    # -- running ---------------------------------------------------------------------------------
    def tap(self, sink: Sink):
        return tap_blocks(self.blocks, sink)  # disarms the spy on the way out, error or not

    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """timm's own unfused softmax output, read by ``AttentionExtract`` on ``attn_drop``, each
        block fed what it receives in the model's own (fused) forward (see ``_reference.py``)."""
        from timm.utils import AttentionExtract

        inputs = block_inputs(self.blocks, lambda: self.model(pixel_values))
        ref = _unfused_copy(self.model)
        names = [f"{self.family.blocks}.{i}.attn.attn_drop" for i in range(self.num_layers)]
        with torch.inference_mode(), fed(list(getattr(ref, self.family.blocks)), inputs):
            out = AttentionExtract(ref, names=names, method="hook")(pixel_values)
        return {i: out[n].float() for i, n in enumerate(names)}


class TimmWindowedAdapter(TimmAdapter):
    """timm models whose layers are not all one global attention (Swin, SwinV2, SAM, CaiT, PiT, MViTv2,
    Twins, XCiT).

    Layers are the attention modules in order (Swin: every block of every stage). Each layer's
    geometry (:meth:`geometry`) says how its attention ``[B * G, H, Tq, Tk]`` maps to the image:
    windows, shifted windows, class attention or a global grid; metrics that cannot describe a
    layer refuse it before the forward pass. The tap is the same SDPA spy as for ViTs.

    Hidden states: the output of the block holding each attention layer, as ``[B, T, C]`` tokens
    with that block's own layout (:meth:`hidden_layouts`: its stage's grid and stride, the prefix
    it carries), so token norms and mean-pooled CKA compare stages whatever their token count.
    """

    global_attention = False
    not_applicable_checks = {
        "check_hidden_is_block_output": "tokens are regrouped between some blocks (patch merging, Twins' "
        "position convolution, a class token joining, Hiera's unrolled order put row-major), so no norm reads "
        "those blocks' outputs; tests/test_hidden_staged.py and test_hidden_hiera.py check every block's output "
        "against forward hooks on the blocks",
    }

    def __init__(self, model: nn.Module, preprocess: Any = None, **info: Any):
        super().__init__(model, preprocess, **info)
        self.staged = GEOMETRIES[self.family.name]
        # instance overrides of the class capabilities
        self.variable_image_size = False
        self.provides_hidden = self.staged.hidden_tokens is not None

    def _attention(self) -> list[tuple[str, nn.Module]]:
        return self.staged.attention(self.model)

    @property
    def num_layers(self) -> int:
        return len(self._attention())

    @property
    def num_heads(self) -> int:
        return _heads(self._attention()[0][1])

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        size = tuple(pixel_values.shape[-2:])
        if size != self.default_image_size:
            raise LayoutError(
                f"This {type(self.model).__name__} was built for {self.default_image_size} inputs and got {size}. "
                f"Load it with image_size={size} (timm rebuilds its windows and position tables), or resize the images."
            )
        kinds = self.staged.prefix(self.model)
        return TokenLayout(len(kinds), self.staged.grid(self.model, size), self.staged.patch(self.model), kinds)

    def geometry(self, pixel_values: torch.Tensor) -> ModelGeometry:
        lay = self.layout(pixel_values)
        return ModelGeometry(lay, self.staged.geometry(self.model, lay), num_layers=self.num_layers)

    def hidden_layouts(self, pixel_values: torch.Tensor) -> dict[int, TokenLayout]:
        """Each layer's block output layout, from its geometry (``_timm_geometry.hidden_layout``)."""
        return layer_layouts(self.geometry(pixel_values), self.num_layers)

    def _watch(self, attn: nn.Module, sink: Sink, layer: int) -> list:
        report = attention_report(sink, layer)
        if self.staged.regroup:
            report = regrouped(report, _heads(attn))
        sub = (self.staged.softmax_of or {}).get(type(attn).__name__)
        if type(attn).__name__ in self.staged.skip:  # no token attention: metrics refused it already
            return []
        if sub is not None:
            return [getattr(attn, sub).register_forward_hook(logits_hook(report))]
        if self.staged.mask_units:
            return watch_sdpa_or_softmax(attn, units_first(report), f"layer {layer}")
        if self.staged.softmax_spy:
            return watch_module_softmax(attn, report, f"layer {layer}")
        return watch_attention(attn, report, f"layer {layer}")

    @contextmanager
    def tap(self, sink: Sink) -> Iterator[None]:
        if sink.wants_hidden and not self.provides_hidden:
            raise UnsupportedArchitectureError(
                f"The timm adapter does not tap block outputs of {type(self.model).__name__} (its blocks' tokens "
                "are not mapped onto a grid yet); use attention metrics on it."
            )
        spy = watch_softmax() if self.staged.softmax_spy or self.staged.mask_units else contextlib.nullcontext()
        blocks = [self.model.get_submodule(name.rsplit(".", 1)[0]) for name, _ in self._attention()]
        staged = self.staged
        outputs = None
        if sink.wants_hidden:
            assert staged.hidden_tokens is not None  # else provides_hidden is False and the check above raised
            outputs = BlockOutputs(self, sink, staged.hidden_tokens, staged.hidden_order)
        handles = [self.model.register_forward_pre_hook(outputs.start)] if outputs else []
        try:
            with spy, tap_blocks(blocks, sink, watch=self._watch, hidden_hook=outputs.hook if outputs else None):
                yield
        finally:
            for h in handles:
                h.remove()

    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """timm's own softmax output on a copy with fused attention off (``attn_drop``'s input; CaiT's
        talking heads: the softmax of ``proj_l``'s output), as ``[B * G, H, Tq, Tk]`` per layer."""
        ref = _unfused_copy(self.model)
        if self.staged.mask_units:  # Hiera's own softmax, read where it is called
            return softmax_reference(ref, [a for _, a in self.staged.attention(ref)], lambda: ref(pixel_values),
                                     fold_windows)
        if self.staged.softmax_spy:  # no module holds the probabilities: trace the softmax calls (torch.fx)
            from timm.utils import AttentionExtract

            names = [f"{n}.softmax" for n, _ in self.staged.attention(ref)]
            with torch.inference_mode():
                out = AttentionExtract(ref, names=names, method="fx")(pixel_values)
            return {i: out[n].float() for i, n in enumerate(names)}
        found: dict[int, torch.Tensor] = {}
        handles = []
        for i, (_, attn) in enumerate(self.staged.attention(ref)):
            heads = int(attn.num_heads)

            def keep(module, args, out, i=i, heads=heads, talking=False):
                p = torch.softmax(out.float().permute(0, 3, 1, 2), -1) if talking else args[0].float()
                found[i] = p.reshape(-1, heads, *p.shape[-2:]) if p.dim() != 4 else p

            sub = (self.staged.softmax_of or {}).get(type(attn).__name__)
            if type(attn).__name__ in self.staged.skip:
                continue
            if sub is not None:
                handles.append(getattr(attn, sub).register_forward_hook(functools.partial(keep, talking=True)))
            else:
                handles.append(attn.attn_drop.register_forward_hook(keep))
        try:
            with torch.inference_mode():
                ref(pixel_values)
        finally:
            for h in handles:
                h.remove()
        return dict(sorted(found.items()))


def _unfused_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every attention's ``fused_attn`` off (timm's own softmax)."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # type: ignore[assignment]  # torch types Module.__setattr__ values Tensor | Module
    return ref


def _heads(attn: LibraryModule) -> int:
    return int(getattr(attn, "num_heads", None) or attn.heads)  # Hiera's attention calls them ``heads``
