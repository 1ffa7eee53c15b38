"""Hugging Face transformers ViTs: ViT, DeiT, DINO, DINOv2 (+registers), CLIP/SigLIP vision, MAE, BEiT;
windowed Swin, SwinV2 and the SAM vision encoder.

Spec: ``hf:<repo id or local directory>``. The model keeps its own SDPA kernel: at bind time
the adapter points the encoder at a deep copy of its config whose attention implementation
is ``"probekit_sdpa"``, a function registered with transformers' ``AttentionInterface`` that
calls the real SDPA and, while a tap is active on that attention module, first hands the
query, key, value, scale and additive mask/bias (BEiT's relative-position bias arrives as the
mask) to the sink; when the sink produced the output from its probability blocks (one
attention pass) that output replaces the SDPA call. Every global family here, and Swin, routes its
attention through that interface in transformers 5 (checked against the installed sources), so no
q/k projection hooks are needed. SwinV2 and the SAM encoder compute theirs in their own modules:
their ``_hf_geometry.Staged`` entry watches those modules instead (the dropout's input; the SDPA
spy of ``_sdpa_spy.py``; the eager module's returned weights).

Families are data (:data:`FAMILIES`, keyed by the encoder config's ``model_type``); known repo
ids are data too (:data:`KNOWN`), so random-init controls build offline without the hub. Both
live in ``_hf_families.py``; loading is in ``_hf_loading.py``, preprocessing in ``_hf_preprocess.py``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from probekit.adapter import Adapter, Sink, wants
from probekit.adapter_options import AdapterOptions
from probekit.attention import LayerAttention, sdpa_dtype
from probekit.errors import ConfigError, LayoutError, UnknownNameError, UnsupportedArchitectureError
from probekit.geometry import ModelGeometry
from probekit.inputs.images import per_channel
from probekit.masks import additive_bias
from probekit.tokens import TokenLayout, pair

from ._hf_families import FAMILIES, KNOWN, check_family, family_of, known_defaults
from ._hf_geometry import STAGED
from ._hf_loading import config_for, load_checkpoint, local_model_files, pretrained_model
from ._hf_preprocess import _Preprocess, cached_processor, processor_for
from ._hiera_geometry import fold_windows, units_first
from ._reference import block_inputs, fed
from ._sdpa_spy import attention_report, watch_sdpa
from ._staged_hidden import BlockOutputs, layer_layouts
from ._timm_geometry import regroup_heads

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["TransformersAdapter", "FAMILIES", "KNOWN", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "probekit_sdpa"

# ------------------------------------------------------------------------------------------------
# the attention function: real SDPA, plus a report to the taps registered on the calling module

_TAPS: dict[nn.Module, list[Callable[[LayerAttention], torch.Tensor | None]]] = {}  # attention module -> reporters


def _probekit_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA, first reporting q, k, v, scale and additive bias when ``module`` is tapped.

    Returns the sink's output when it produced one (one attention pass), in the layout
    ``sdpa_attention_forward`` returns (``[B, T, H, dv]``, contiguous).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    reporters = _TAPS.get(module)
    if reporters:
        k, v = key, value
        if k.shape[1] != query.shape[1]:  # grouped key/value heads
            k = repeat_kv(k, query.shape[1] // k.shape[1])
            v = repeat_kv(v, query.shape[1] // v.shape[1])
        causal = kwargs.get("is_causal", getattr(module, "is_causal", False)) and attention_mask is None
        fusable = not dropout and not causal and kwargs.get("softcap") is None
        bias = additive_bias(attention_mask, true_means="attend")
        if kwargs.get("position_bias") is not None:
            bias = kwargs["position_bias"] if bias is None else bias + kwargs["position_bias"]
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        attn = LayerAttention(q=query, k=k, scale=scale, bias=bias, v=v if fusable else None,
                              out_dtype=sdpa_dtype(query))
        output = None
        for report in reporters:
            made = report(attn)
            if made is not None:  # one sink produced it; the others only read
                output, attn = made, dataclasses.replace(attn, v=None)
        if output is not None:
            return output.transpose(1, 2), None
        del attn
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _probekit_sdpa)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # masks shaped as for SDPA


# ------------------------------------------------------------------------------------------------
# finding the encoder and binding it (building: _hf_loading.py)


def _find_encoder(module: nn.Module) -> nn.Module | None:
    """The family encoder inside ``module`` (itself, a classification head's base, CLIP's vision tower,
    SAM's vision encoder). Classes are matched by name: not every encoder class is exported at the
    top of ``transformers`` (``SamVisionEncoder``)."""
    for m in module.modules():
        fam = family_of(getattr(m, "config", None))
        if fam is not None and any(c.__name__ == fam.model_class for c in type(m).__mro__):
            return m
    return None


def _config_of(module: nn.Module) -> PretrainedConfig:
    """A transformers model's ``config`` (torch's stubs type module attributes as ``Tensor | Module``)."""
    return cast("PretrainedConfig", module.config)


def _bind(encoder: nn.Module) -> nn.Module:
    """Point ``encoder`` at a deep copy of its config that uses ``probekit_sdpa``.

    The copy keeps other models that share the original config unchanged; the MAE copy also
    keeps every token (``mask_ratio=0``; the identity order comes from the forward's noise).
    """
    _register_attention()
    old = _config_of(encoder)
    new = copy.deepcopy(old)
    new._attn_implementation = ATTN_IMPLEMENTATION
    if check_family(new, type(encoder).__name__).mae:  # the family _find_encoder matched
        new.mask_ratio = 0.0
    for m in encoder.modules():
        if getattr(m, "config", None) is old:
            m.config = new  # type: ignore[assignment]  # torch types Module.__setattr__ values Tensor | Module
    return encoder


# ------------------------------------------------------------------------------------------------


class TransformersOptions(AdapterOptions):
    """transformers: the common options and ``config`` (a config object or a dict of overrides)."""

    config: Any = None


class TransformersAdapter(Adapter):
    """Hugging Face transformers ViT encoders, tapped through a registered SDPA function.

    >>> import probekit as pk                                                  # doctest: +SKIP
    >>> pm = pk.load("hf:facebook/dino-vits16", pretrained=False)               # doctest: +SKIP
    >>> pm.layout(pm.example_input()).describe()                                # doctest: +SKIP
    '1 prefix (cls) + 14x14 patches of 16x16 px = 197 tokens'
    """

    name = "hf"
    library = "transformers"
    extra = "transformers"
    options_schema = TransformersOptions
    in_chans: int  # the config's num_channels, set in __init__

    def __init__(self, model: nn.Module, preprocess: Any = None, **info: Any):
        super().__init__(model, preprocess, **info)
        self.family = check_family(model.config, type(model).__name__)
        self.staged = STAGED[self.family.staged] if self.family.staged else None
        if self.staged:  # windows and stages: every block of every stage, in order
            self.blocks = self.staged.blocks(model)
            # instance overrides of the class capabilities
            self.global_attention = self.variable_image_size = False
            self.provides_hidden = self.staged.hidden_tokens is not None
            if self.provides_hidden:
                self.not_applicable_checks = {"check_hidden_is_block_output": _REGROUPED}
        else:
            self.blocks = _blocks(model, self.family)
        self.attentions = [getattr(b, self.family.attention) for b in self.blocks]
        self.info.setdefault("image_size", pair(_config_of(model).image_size))
        self.info.setdefault("model_type", _config_of(model).model_type)
        self.in_chans = int(getattr(model.config, "num_channels", 3))

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, name: str, *, pretrained: bool = True, checkpoint: str | None = None,
                  image_size: int | tuple[int, int] | None = None, config: Any = None,
                  **options: Any) -> TransformersAdapter:
        """Build the encoder of ``name`` (a repo id or a local directory).

        Args:
            name: ``google/vit-base-patch16-224``, ``facebook/dinov2-small``, ... or a directory with
                ``config.json`` (+ weights).
            pretrained: load weights (directory or HF cache; downloads only when online). False:
                random init from the config (a control), offline for the repo ids of :data:`KNOWN`.
            checkpoint: a local state-dict file (``.safetensors``/``.bin``/``.pt``) loaded into the
                model built from ``name``'s config.
            image_size: input size ``H`` or ``(H, W)`` the preprocessing produces (default: native).
            config: a transformers config object, or a dict of config overrides (tiny test models).

        Raises:
            UnknownNameError: a repo id that is not local, not cached and not known offline.
            WeightsUnavailableError: pretrained weights not on this machine.
            UnsupportedArchitectureError: a model type this adapter does not know.
        """
        import transformers

        if options:
            raise ConfigError(f"Unknown option(s) for hf: {', '.join(sorted(options))}. Allowed: pretrained, "
                              "checkpoint, image_size, config.")
        overrides = config if config is not None else {}
        if not isinstance(overrides, (dict, transformers.PretrainedConfig)):
            raise ConfigError(f"config= must be a transformers config or a dict of overrides, not "
                              f"{type(overrides).__name__}.")
        if pretrained and checkpoint is None:
            model = pretrained_model(name, overrides)
        else:
            cfg = config_for(name, overrides)
            fam = check_family(cfg, name)
            model_class = getattr(transformers, fam.loader or fam.model_class)
            model = model_class(cfg) if checkpoint is None else load_checkpoint(model_class, cfg, checkpoint)
        return cls._make(model, repo=name, image_size=image_size, pretrained=bool(pretrained or checkpoint))

    @classmethod
    def check_spec(cls, name: str, *, config: Any = None, **options: Any) -> None:
        """``name`` is a local directory, a repo in the Hugging Face cache or one probekit knows
        offline; else, with the hub offline, nothing could load it (no model built, no weights read)."""
        from huggingface_hub import constants, try_to_load_from_cache

        from ._hf_loading import hub_hint

        if (config is not None and not isinstance(config, dict)) or Path(name).is_dir() or name in KNOWN:
            return  # a config object (the Python API), or a folder whose config.json the load reads
        try:
            cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        except Exception:  # not a valid repo id: no cache holds it
            cached = False
        if not cached and constants.HF_HUB_OFFLINE:
            raise UnknownNameError("transformers model", name, KNOWN, hint=(
                "It is neither a local directory, nor in the Hugging Face cache, nor a repo id probekit "
                "knows offline. " + hub_hint(name, random_init=False)))

    @classmethod
    def weight_files(cls, name: str, **options: Any) -> list[Path]:
        """A local directory's files, or the cached hub snapshot's, and a ``checkpoint=`` file."""
        return [*local_model_files(name), *super().weight_files(name, **options)]

    @classmethod
    def _make(cls, model: nn.Module, repo: str | None, image_size=None, **info) -> TransformersAdapter:
        encoder = _find_encoder(model)
        if encoder is None:
            raise UnsupportedArchitectureError(
                f"No supported vision encoder inside {type(model).__name__}; the hf adapter knows "
                f"{', '.join(f.model_class for f in FAMILIES.values())} (and models that contain one).")
        _bind(encoder)
        fam = FAMILIES[_config_of(encoder).model_type]
        size = pair(image_size) if image_size is not None else pair(_config_of(encoder).image_size)
        known_cfg, known_proc = known_defaults(repo)
        if image_size is None and "image_size" in known_proc and size == pair(known_cfg.get("image_size", -1)):
            size = pair(known_proc["image_size"])  # the stock config's processor crops smaller
        proc = cached_processor(repo) if (repo is not None and image_size is None) else None
        if proc is not None:  # the repo's own processor: the kit compares preprocess with it
            info["processor"] = repo
            crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
            crop = crop or getattr(proc, "size", None) or {}
            if "height" in crop:
                size = (int(crop["height"]), int(crop["width"]))
        proc = proc or processor_for(fam, size, repo)
        ad = cls(encoder, _Preprocess(proc), image_size=size, wrapped=type(model).__name__, **info)
        chans, norm = ad.in_chans, getattr(proc, "do_normalize", True)
        ad.image_mean = per_channel(proc.image_mean if norm else (0.0,), chans)  # what the processor normalises with
        ad.image_std = per_channel(proc.image_std if norm else (1.0,), chans)
        if "processor" not in ad.info:
            ad.not_applicable_checks = {**ad.not_applicable_checks, "check_preprocess_matches_library": _NO_PROCESSOR}
        return ad

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        try:
            from transformers import PreTrainedModel
        except ImportError:
            return False
        return isinstance(module, PreTrainedModel) and _find_encoder(module) is not None

    @classmethod
    def from_module(cls, module: nn.Module, image_size=None, **options: Any) -> TransformersAdapter:
        """Bind a loaded transformers model (a head model binds its encoder; CLIPModel its vision tower).

        The encoder's modules are pointed at a deep copy of its config that runs SDPA through
        probekit's attention function (same maths; the MAE copy keeps every token in order).
        """
        if options:
            raise ConfigError(f"Unknown option(s) for hf wrap: {', '.join(sorted(options))}.")
        return cls._make(module, repo=None, image_size=image_size)

    # -- describing ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        cfg = _config_of(self.model)
        heads = getattr(cfg, "num_attention_heads", None) or cfg.num_heads  # Hiera: num_heads
        return int(heads[0] if isinstance(heads, (list, tuple)) else heads)  # Swin, Hiera: per stage

    @property
    def patch_size(self) -> tuple[int, int]:
        return pair(getattr(self.model.config, self.family.patch))

    def prefix_kinds(self) -> tuple[str, ...]:
        regs = int(getattr(self.model.config, "num_register_tokens", 0)) if self.family.registers else 0
        return self.family.prefix_kinds + ("reg",) * regs

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        """Prefix tokens of the family, then the grid the patch convolution floors to."""
        ph, pw = self.patch_size
        h, w = pixel_values.shape[-2:]
        kinds = self.prefix_kinds()
        if self.staged and self.staged.fixed_size and (h, w) != pair(_config_of(self.model).image_size):
            n = pair(_config_of(self.model).image_size)
            raise LayoutError(
                f"This {type(self.model).__name__} takes only {n} inputs (its position table is added without "
                f"resampling) and got {(h, w)}. Resize the images to {n}, or for a random-init model load it "
                f"with config={{'image_size': {h}}}.")
        if self.staged and not self.staged.fixed_size:  # Swin pads the image to whole patches
            return TokenLayout(len(kinds), (-(-h // ph), -(-w // pw)), (ph, pw), kinds)
        return TokenLayout(num_prefix=len(kinds), grid=(h // ph, w // pw), patch_size=(ph, pw), prefix_kinds=kinds)

    def geometry(self, pixel_values: torch.Tensor) -> ModelGeometry:
        lay = self.layout(pixel_values)
        if not self.staged:
            return ModelGeometry(lay, num_layers=self.num_layers)
        return ModelGeometry(lay, self.staged.geometry(self.model, lay), num_layers=self.num_layers)

    def hidden_layouts(self, pixel_values: torch.Tensor) -> dict[int, TokenLayout]:
        """Each layer's block output layout: staged encoders' from that layer's geometry."""
        if not self.staged:
            return super().hidden_layouts(pixel_values)
        return layer_layouts(self.geometry(pixel_values), self.num_layers)

    # -- running -------------------------------------------------------------------------------
    def _kwargs(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        kw = dict(self.family.forward_kwargs)
        if self.family.mae:  # argsort(arange) is the identity: original order, nothing dropped
            n = self.layout(pixel_values).num_patches
            kw["noise"] = torch.arange(n, device=pixel_values.device, dtype=torch.float32).expand(
                pixel_values.shape[0], n)
        return kw

    def forward(self, pixel_values: torch.Tensor) -> Any:
        return self.model(pixel_values, **self._kwargs(pixel_values))

    @contextmanager
    def tap(self, sink: Sink) -> Iterator[None]:
        if sink.wants_hidden and not self.provides_hidden:
            raise UnsupportedArchitectureError(
                f"The hf adapter does not tap block outputs of {type(self.model).__name__} (its blocks' tokens "
                "are not mapped onto a grid yet); use attention metrics on it.")
        if self.family.softmax_tap:
            with self._softmax_tap(sink):
                yield
            return
        reporters, hooks = [], []
        watch = self.staged.watch if self.staged else None  # attention outside the AttentionInterface
        if sink.wants_attention:
            for i, attn in enumerate(self.attentions):
                if wants(sink, i) and watch is not None:
                    hooks += watch(attn, attention_report(sink, i), f"layer {i}")
                elif wants(sink, i):
                    report = partial(sink.attention, i)
                    _TAPS.setdefault(attn, []).append(report)
                    reporters.append((attn, report))
        hooks += self._hidden_hooks(sink)
        try:
            with watch_sdpa() if watch is not None else nullcontext():
                yield
        finally:
            for attn, report in reporters:
                _TAPS[attn].remove(report)
                if not _TAPS[attn]:
                    del _TAPS[attn]
            for h in hooks:
                h.remove()

    def _hidden_hooks(self, sink: Sink) -> list:
        """Forward hooks handing each wanted block's output to ``sink.hidden`` (staged encoders: with the
        block's own layout, computed when the forward starts, tokens put row-major)."""
        if not sink.wants_hidden:
            return []
        hooks, outputs = [], None
        if self.staged:
            assert self.staged.hidden_tokens is not None  # else provides_hidden is False and tap() refused
            outputs = BlockOutputs(self, sink, self.staged.hidden_tokens, self.staged.hidden_order)
            hooks.append(self.model.register_forward_pre_hook(outputs.start))
        for i, block in enumerate(self.blocks):
            if wants(sink, i):
                hook = outputs.hook(i) if outputs else partial(_hidden_hook, sink, i)
                hooks.append(block.register_forward_hook(hook))
        return hooks

    @contextmanager
    def _softmax_tap(self, sink: Sink) -> Iterator[None]:
        """Hiera computes its attention by hand: read each layer at its ``Tensor.softmax`` call."""
        from ._timm_geometry import regrouped, watch_module_softmax, watch_softmax

        hooks = []
        with watch_softmax():
            try:
                hooks += self._hidden_hooks(sink)
                for i, attn in enumerate(self.attentions):
                    if sink.wants_attention and wants(sink, i):
                        report = units_first(regrouped(attention_report(sink, i), int(attn.num_heads)))
                        hooks += watch_module_softmax(attn, report, f"layer {i}")
                yield
            finally:
                for h in hooks:
                    h.remove()

    @torch.inference_mode()
    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """Eager attention of a copy (same weights, config deep-copied with ``eager``); global
        families feed each layer what it receives in the model's own (SDPA) forward (``_reference.py``)."""
        ref = copy.deepcopy(self.model)
        _config_of(ref)._attn_implementation = "eager"
        if self.staged:  # output_attentions keeps one block per stage: read every block's weights
            if self.staged.eager is not None:
                self.staged.eager(ref)
            found: dict[int, torch.Tensor] = {}
            blocks = self.staged.blocks(ref)

            def keep(i, mod, args, out):  # SAM's as [B * heads, N, N], Hiera's [B, H, G, N, N]
                found[i] = regroup_heads(fold_windows(out[1]), getattr(mod, "num_attention_heads", 0)).float()

            hooks = [getattr(b, self.family.attention).register_forward_hook(partial(keep, i))
                     for i, b in enumerate(blocks)]
            try:
                ref(pixel_values, output_attentions=True, **self._kwargs(pixel_values))
            finally:
                for h in hooks:
                    h.remove()
            return found
        inputs = block_inputs(self.blocks, lambda: self.forward(pixel_values))
        with fed(_blocks(ref, self.family), inputs):
            out = ref(pixel_values, output_attentions=True, **self._kwargs(pixel_values))
        if not out.attentions:
            raise RuntimeError(f"{type(ref).__name__} returned no attentions under eager attention.")
        return {i: a.float() for i, a in enumerate(out.attentions)}


_NO_PROCESSOR = ("no image processor files where the model was loaded from (built from a config, a wrapped module, "
                 "or image_size= given): its processor is the family's transformers class with probekit's known "
                 "defaults (_hf_families), so there is no processor of the library's to compare preprocess with")
_REGROUPED = ("tokens are regrouped between some blocks (Swin's patch merging), read by the next norm as a "
              "[B, H, W, C] grid (SAM) or put row-major from the unrolled order (Hiera), so no norm reads the "
              "[B, T, C] tokens reported; tests/test_hidden_staged_hf.py and test_hidden_hiera.py check every "
              "block's output against forward hooks on the blocks and the library's own reroll")


def _blocks(encoder: nn.Module, family) -> list[nn.Module]:
    """The encoder's transformer layers, in order (at the family's attribute path)."""
    blocks: nn.Module = encoder
    for part in family.blocks.split("."):
        blocks = getattr(blocks, part)
    return list(cast(nn.ModuleList, blocks))  # the family's ModuleList of blocks


def _hidden_hook(sink: Sink, layer: int, module, args, output) -> None:
    sink.hidden(layer, output[0] if isinstance(output, (tuple, list)) else output)
