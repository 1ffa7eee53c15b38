"""Hugging Face transformers ViTs: ViT, DeiT, DINO, DINOv2 (+registers), CLIP/SigLIP vision, MAE, BEiT.

Spec: ``hf:<repo id or local directory>``. The model keeps its own SDPA kernel: at bind time
the adapter points the encoder at a deep copy of its config whose attention implementation
is ``"probekit_sdpa"``, a function registered with transformers' ``AttentionInterface`` that
calls the real SDPA and, while a tap is active on that attention module, first hands the
query, key, scale and additive mask/bias (BEiT's relative-position bias arrives as the mask)
to the sink. Every family here routes its attention through that interface in transformers 5
(checked against the installed sources), so no q/k projection hooks are needed.

Families are data (:data:`FAMILIES`, keyed by the encoder config's ``model_type``); known repo
ids are data too (:data:`KNOWN`), so random-init controls build offline without the hub.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from probekit.adapter import Adapter, Sink, wants
from probekit.attention import LayerAttention
from probekit.errors import ConfigError, UnknownNameError, UnsupportedArchitectureError, WeightsUnavailableError
from probekit.tokens import TokenLayout

__all__ = ["TransformersAdapter", "FAMILIES", "KNOWN", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "probekit_sdpa"
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


@dataclass(frozen=True)
class Family:
    """How to drive one transformers vision encoder (a row of :data:`FAMILIES`)."""

    model_class: str  # the encoder class in ``transformers``
    blocks: str  # dotted path from the encoder to its ModuleList of blocks
    attention: str  # attribute of a block holding its attention module
    prefix_kinds: tuple[str, ...]  # fixed prefix tokens, in order
    registers: bool = False  # + ``config.num_register_tokens`` tokens of kind "reg" after them
    forward_kwargs: dict = field(default_factory=dict)  # e.g. position-embedding interpolation
    mae: bool = False  # masking off, identity token order (random_masking shuffles at ratio 0)
    processor: str = "ViTImageProcessor"
    norm: tuple = _IMAGENET  # default mean/std (a known repo may override)
    crop_ratio: float | None = None  # None: resize to size; else shortest edge size*ratio, centre crop
    resample: int = 3  # PIL bicubic


_INTERP = {"interpolate_pos_encoding": True}

# encoder model_type -> family
FAMILIES: dict[str, Family] = {
    "vit": Family("ViTModel", "layers", "attention", ("cls",), forward_kwargs=_INTERP, norm=_HALF, resample=2),
    "deit": Family("DeiTModel", "layers", "attention", ("cls", "dist"), forward_kwargs=_INTERP,
                   processor="DeiTImageProcessor", crop_ratio=256 / 224),
    "clip_vision_model": Family("CLIPVisionModel", "encoder.layers", "self_attn", ("cls",), forward_kwargs=_INTERP,
                                processor="CLIPImageProcessor", norm=_CLIP, crop_ratio=1.0),
    "dinov2": Family("Dinov2Model", "encoder.layer", "attention", ("cls",), processor="BitImageProcessor",
                     crop_ratio=256 / 224),
    "dinov2_with_registers": Family("Dinov2WithRegistersModel", "encoder.layer", "attention", ("cls",),
                                    registers=True, processor="BitImageProcessor", crop_ratio=256 / 224),
    "siglip_vision_model": Family("SiglipVisionModel", "encoder.layers", "self_attn", (), forward_kwargs=_INTERP,
                                  processor="SiglipImageProcessor", norm=_HALF),
    "vit_mae": Family("ViTMAEModel", "layers", "attention", ("cls",), forward_kwargs=_INTERP, mae=True),
    "beit": Family("BeitModel", "layers", "attention", ("cls",), processor="BeitImageProcessor", norm=_HALF),
}
# multimodal model_type -> the attribute of its config that holds the vision encoder's config
VISION_SUBCONFIG = {"clip": "vision_config", "siglip": "vision_config"}

_S = dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536)
_DV2_S = dict(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14, layer_scale_init_value=1.0)
_DV2_B = dict(hidden_size=768, num_attention_heads=12, image_size=518, patch_size=14, layer_scale_init_value=1.0)
_PROC_224 = {"image_size": 224}  # processors of the 518-px DINOv2 configs crop to 224

# repo id -> (config class, config kwargs, processor overrides): random-init controls offline
KNOWN: dict[str, tuple[str, dict, dict]] = {
    "google/vit-base-patch16-224": ("ViTConfig", {}, {}),
    "facebook/deit-small-patch16-224": ("ViTConfig", _S, {"processor": "DeiTImageProcessor", "norm": _IMAGENET,
                                                           "crop_ratio": 256 / 224, "resample": 3}),
    "facebook/deit-base-distilled-patch16-224": ("DeiTConfig", {}, {}),
    "facebook/dino-vits16": ("ViTConfig", _S, {"norm": _IMAGENET}),
    "facebook/dino-vitb16": ("ViTConfig", {}, {"norm": _IMAGENET}),
    "facebook/dinov2-small": ("Dinov2Config", _DV2_S, _PROC_224),
    "facebook/dinov2-base": ("Dinov2Config", _DV2_B, _PROC_224),
    "facebook/dinov2-with-registers-small": ("Dinov2WithRegistersConfig", {**_DV2_S, "num_register_tokens": 4},
                                             _PROC_224),
    "facebook/dinov2-with-registers-base": ("Dinov2WithRegistersConfig", {**_DV2_B, "num_register_tokens": 4},
                                            _PROC_224),
    "openai/clip-vit-base-patch16": ("CLIPVisionConfig", dict(patch_size=16, hidden_act="quick_gelu"), {}),
    "openai/clip-vit-large-patch14": ("CLIPVisionConfig", dict(hidden_size=1024, intermediate_size=4096,
                                                               num_attention_heads=16, num_hidden_layers=24,
                                                               patch_size=14, hidden_act="quick_gelu"), {}),
    "google/siglip-base-patch16-224": ("SiglipVisionConfig", dict(layer_norm_eps=1e-6), {}),
    "facebook/vit-mae-base": ("ViTMAEConfig", {}, {}),
    "microsoft/beit-base-patch16-224": ("BeitConfig", dict(use_relative_position_bias=True,
                                                           use_absolute_position_embeddings=False,
                                                           layer_scale_init_value=0.1, use_mean_pooling=True), {}),
}

# ------------------------------------------------------------------------------------------------
# the attention function: real SDPA, plus a report to the taps registered on the calling module

_TAPS: dict[nn.Module, list[Callable[[LayerAttention], None]]] = {}  # attention module -> reporters


def _probekit_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA, first reporting q, k, scale and additive bias when ``module`` is tapped."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    reporters = _TAPS.get(module)
    if reporters:
        k = key
        if k.shape[1] != query.shape[1]:  # grouped key/value heads
            k = repeat_kv(k, query.shape[1] // k.shape[1])
        bias = attention_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, device=bias.device).masked_fill(~bias, float("-inf"))
        if kwargs.get("position_bias") is not None:
            bias = kwargs["position_bias"] if bias is None else bias + kwargs["position_bias"]
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        attn = LayerAttention(q=query, k=k, scale=scale, bias=bias)
        for report in reporters:
            report(attn)
        del attn
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _probekit_sdpa)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # masks shaped as for SDPA


# ------------------------------------------------------------------------------------------------
# finding the encoder, binding it, building it


def _family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", ""))


def _vision_config(config):
    sub = VISION_SUBCONFIG.get(getattr(config, "model_type", ""))
    return getattr(config, sub) if sub else config


def _find_encoder(module: nn.Module) -> nn.Module | None:
    """The family encoder inside ``module`` (itself, a classification head's base, CLIP's vision tower)."""
    import transformers

    for m in module.modules():
        fam = _family_of(getattr(m, "config", None))
        if fam is not None and isinstance(m, getattr(transformers, fam.model_class)):
            return m
    return None


def _bind(encoder: nn.Module) -> nn.Module:
    """Point ``encoder`` at a deep copy of its config that uses ``probekit_sdpa``.

    The copy keeps other models that share the original config unchanged; the MAE copy also
    keeps every token (``mask_ratio=0``; the identity order comes from the forward's noise).
    """
    _register_attention()
    old = encoder.config
    new = copy.deepcopy(old)
    new._attn_implementation = ATTN_IMPLEMENTATION
    if _family_of(new).mae:
        new.mask_ratio = 0.0
    for m in encoder.modules():
        if getattr(m, "config", None) is old:
            m.config = new
    return encoder


def _known_config(repo: str, overrides: dict):
    import transformers

    cls_name, kwargs, _ = KNOWN[repo]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def _hub_hint(repo: str) -> str:
    from huggingface_hub import constants

    return (f"The Hugging Face cache is {constants.HF_HUB_CACHE}. On a connected machine run "
            f"`hf download {repo}` (or `huggingface-cli download {repo}`) and copy the cache here, "
            "or pass pretrained=False for a random-init control (HF_HUB_OFFLINE=1 skips network retries).")


def _config_for(name: str, overrides: dict):
    """The encoder config of ``name``: a local directory, the HF cache, then :data:`KNOWN`."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(overrides, PretrainedConfig):
        return _vision_config(overrides)
    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if Path(name).is_dir():
            raise ConfigError(f"{name!r} is a directory without a readable config.json: {exc}") from exc
        if name not in KNOWN:
            raise UnknownNameError("transformers model", name, KNOWN, hint=(
                "It is neither a local directory, nor in the Hugging Face cache, nor a repo id probekit "
                "knows offline. " + _hub_hint(name))) from None
        return _known_config(name, overrides)
    cfg = _vision_config(cfg)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _check_family(cfg, name: str) -> Family:
    fam = _family_of(cfg)
    if fam is None:
        raise UnsupportedArchitectureError(
            f"{name!r} is a {getattr(cfg, 'model_type', '?')!r} model; the hf adapter knows "
            f"{', '.join(sorted(FAMILIES))} (and CLIP/SigLIP vision towers). Use another backend (timm:, "
            "open_clip:) or write an adapter.")
    return fam


def _pretrained(name: str, overrides: dict) -> nn.Module:
    """Weights from a local directory or the HF cache (downloading only when the hub is online)."""
    import transformers
    from huggingface_hub import constants

    tries = [True] if (constants.HF_HUB_OFFLINE or Path(name).is_dir()) else [True, False]
    error: Exception | None = None
    for local in tries:
        try:
            if isinstance(overrides, transformers.PretrainedConfig):
                cfg = _vision_config(overrides)
            else:
                cfg = _vision_config(transformers.AutoConfig.from_pretrained(name, local_files_only=local))
                for key, value in overrides.items():
                    setattr(cfg, key, value)
            fam = _check_family(cfg, name)
            return getattr(transformers, fam.model_class).from_pretrained(
                name, config=cfg, local_files_only=local, dtype=torch.float32)
        except (OSError, ValueError) as exc:  # missing files, or no network
            error = exc
    if name not in KNOWN and not Path(name).is_dir():
        raise UnknownNameError("transformers model", name, KNOWN, hint=_hub_hint(name)) from None
    raise WeightsUnavailableError(
        f"Pretrained weights for {name!r} are not on this machine and cannot be downloaded now "
        f"({type(error).__name__}). {_hub_hint(name)}") from error


def _load_checkpoint(model_class, cfg, path: str) -> nn.Module:
    """A model of ``cfg`` with the weights of a state-dict file, loaded by transformers itself.

    transformers 5 saves legacy key names and converts them on load, and strips head prefixes
    (``vit.``, ``vision_model.``), so the file goes through ``from_pretrained`` from a temporary
    directory holding ``cfg`` rather than through ``load_state_dict``.
    """
    import tempfile

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint={path!r} is not a file; give a .safetensors/.bin/.pt state dict, "
                          "or a directory with config.json as the spec (hf:<directory>).")
    with tempfile.TemporaryDirectory(prefix="probekit-hf-") as tmp:
        cfg.save_pretrained(tmp)
        if p.suffix == ".safetensors":
            os.symlink(p.resolve(), Path(tmp) / "model.safetensors")
        else:
            from safetensors.torch import save_file

            sd = torch.load(str(p), map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                sd = sd.get(key, sd) if isinstance(sd, dict) else sd
            save_file({k: v.contiguous() for k, v in sd.items()}, str(Path(tmp) / "model.safetensors"))
        model, info = model_class.from_pretrained(tmp, output_loading_info=True, local_files_only=True,
                                                  dtype=torch.float32)
    fam = _family_of(model.config)
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(fam.blocks) or "embeddings" in k]
    if missing:
        raise ConfigError(f"checkpoint {path!r} lacks {len(missing)} of the encoder's tensors (e.g. "
                          f"{', '.join(sorted(missing)[:3])}); is it for this architecture and size?")
    return model


# ------------------------------------------------------------------------------------------------
# preprocessing: the family's own image processor


class _Preprocess:
    """PIL RGB image -> ``[3, H, W]`` float tensor through a transformers image processor (picklable)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0].float()

    def __repr__(self) -> str:
        return f"_Preprocess({type(self.processor).__name__})"


def _processor(fam: Family, size: tuple[int, int], repo: str | None) -> Any:
    """The family's processor class at ``size``, with a known repo's mean/std/crop (no files needed)."""
    import transformers

    opts = dict(processor=fam.processor, norm=fam.norm, crop_ratio=fam.crop_ratio, resample=fam.resample)
    opts.update(KNOWN.get(repo, (None, {}, {}))[2])
    h, w = size
    kwargs = dict(image_mean=list(opts["norm"][0]), image_std=list(opts["norm"][1]), resample=opts["resample"],
                  do_resize=True, do_rescale=True, do_normalize=True)
    if opts["crop_ratio"] is None:
        kwargs.update(size={"height": h, "width": w}, do_center_crop=False)
    else:
        kwargs.update(size={"shortest_edge": round(max(h, w) * opts["crop_ratio"])},
                      crop_size={"height": h, "width": w}, do_center_crop=True)
    return getattr(transformers, opts["processor"])(**kwargs)


def _cached_processor(repo: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(repo, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


# ------------------------------------------------------------------------------------------------


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
    reference = "transformers eager attention, output_attentions=True"

    def __init__(self, model: nn.Module, preprocess: Any = None, **info: Any):
        super().__init__(model, preprocess, **info)
        self.family = _check_family(model.config, type(model).__name__)
        blocks: nn.Module = model
        for part in self.family.blocks.split("."):
            blocks = getattr(blocks, part)
        self.blocks = list(blocks)
        self.attentions = [getattr(b, self.family.attention) for b in self.blocks]
        self.info.setdefault("image_size", _pair(model.config.image_size))
        self.info.setdefault("model_type", model.config.model_type)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, name: str, *, pretrained: bool = True, checkpoint: str | None = None,
                  image_size: int | tuple[int, int] | None = None, config: Any = None,
                  **options: Any) -> "TransformersAdapter":
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
            model = _pretrained(name, overrides)
        else:
            cfg = _config_for(name, overrides)
            fam = _check_family(cfg, name)
            model_class = getattr(transformers, fam.model_class)
            model = model_class(cfg) if checkpoint is None else _load_checkpoint(model_class, cfg, checkpoint)
        return cls._make(model, repo=name, image_size=image_size, pretrained=bool(pretrained or checkpoint))

    @classmethod
    def _make(cls, model: nn.Module, repo: str | None, image_size=None, **info) -> "TransformersAdapter":
        encoder = _find_encoder(model)
        if encoder is None:
            raise UnsupportedArchitectureError(
                f"No supported vision encoder inside {type(model).__name__}; the hf adapter knows "
                f"{', '.join(f.model_class for f in FAMILIES.values())} (and models that contain one).")
        _bind(encoder)
        fam = FAMILIES[encoder.config.model_type]
        size = _pair(image_size) if image_size is not None else _pair(encoder.config.image_size)
        _, known_cfg, known_proc = KNOWN.get(repo, (None, {}, {}))
        if image_size is None and "image_size" in known_proc and size == _pair(known_cfg.get("image_size", -1)):
            size = _pair(known_proc["image_size"])  # the stock config's processor crops smaller
        proc = _cached_processor(repo) if (repo is not None and image_size is None) else None
        if proc is not None:
            crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
            crop = crop or getattr(proc, "size", None) or {}
            if "height" in crop:
                size = (int(crop["height"]), int(crop["width"]))
        proc = proc or _processor(fam, size, repo)
        return cls(encoder, _Preprocess(proc), image_size=size, wrapped=type(model).__name__, **info)

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        try:
            from transformers import PreTrainedModel
        except ImportError:
            return False
        return isinstance(module, PreTrainedModel) and _find_encoder(module) is not None

    @classmethod
    def from_module(cls, module: nn.Module, image_size=None, **options: Any) -> "TransformersAdapter":
        """Bind a loaded transformers model (a head model binds its encoder; CLIPModel its vision tower).

        The encoder's modules are pointed at a deep copy of its config that runs SDPA through
        probekit's attention function (same maths; the MAE copy keeps every token in order).
        """
        if options:
            raise ConfigError(f"Unknown option(s) for hf wrap: {', '.join(sorted(options))}.")
        return cls._make(module, repo=None, image_size=image_size)

    @classmethod
    def model_names(cls) -> list[str]:
        return sorted(KNOWN)

    # -- describing ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    @property
    def patch_size(self) -> tuple[int, int]:
        return _pair(self.model.config.patch_size)

    def prefix_kinds(self) -> tuple[str, ...]:
        regs = int(getattr(self.model.config, "num_register_tokens", 0)) if self.family.registers else 0
        return self.family.prefix_kinds + ("reg",) * regs

    def layout(self, pixel_values: torch.Tensor) -> TokenLayout:
        """Prefix tokens of the family, then the grid the patch convolution floors to."""
        ph, pw = self.patch_size
        h, w = pixel_values.shape[-2:]
        kinds = self.prefix_kinds()
        return TokenLayout(num_prefix=len(kinds), grid=(h // ph, w // pw), patch_size=(ph, pw), prefix_kinds=kinds)

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
        reporters, hooks = [], []
        if sink.wants_attention:
            for i, attn in enumerate(self.attentions):
                if wants(sink, i):
                    report = partial(sink.attention, i)
                    _TAPS.setdefault(attn, []).append(report)
                    reporters.append((attn, report))
        if sink.wants_hidden:
            for i, block in enumerate(self.blocks):
                if wants(sink, i):
                    hooks.append(block.register_forward_hook(partial(_hidden_hook, sink, i)))
        try:
            yield
        finally:
            for attn, report in reporters:
                _TAPS[attn].remove(report)
                if not _TAPS[attn]:
                    del _TAPS[attn]
            for h in hooks:
                h.remove()

    @torch.inference_mode()
    def reference_attention(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """Eager attention of a copy (same weights, config deep-copied with ``eager``)."""
        ref = copy.deepcopy(self.model)
        ref.config._attn_implementation = "eager"
        out = ref(pixel_values, output_attentions=True, **self._kwargs(pixel_values))
        if not out.attentions:
            raise RuntimeError(f"{type(ref).__name__} returned no attentions under eager attention.")
        return {i: a.float() for i, a in enumerate(out.attentions)}


def _hidden_hook(sink: Sink, layer: int, module, args, output) -> None:
    sink.hidden(layer, output[0] if isinstance(output, (tuple, list)) else output)
