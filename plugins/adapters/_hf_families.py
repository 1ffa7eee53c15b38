"""The transformers families and repos probekit knows, as data.

:data:`FAMILIES` says how to drive each vision encoder (keyed by its config's ``model_type``);
:data:`KNOWN` holds the config and processor defaults of known repo ids, so random-init controls
build offline without the hub. The adapter (``transformers.py``) reads them; add a family or a
repo here without touching its code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from probekit.errors import UnsupportedArchitectureError

__all__ = ["Family", "FAMILIES", "VISION_SUBCONFIG", "KNOWN", "known_defaults", "family_of", "vision_config",
           "check_family"]

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
    staged: str | None = None  # windowed/staged encoder: its entry in _hf_geometry.STAGED (e.g. "swin")
    patch: str = "patch_size"  # the config attribute with the token stride (Hiera: patch_stride; its kernel is 7)
    softmax_tap: bool = False  # attention computed by hand, read at its Tensor.softmax (Hiera)
    loader: str | None = None  # the class built or loaded (default model_class) when it wraps the encoder
    letterbox: bool = False  # the processor resizes the longest edge and pads bottom-right (SAM)


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
    "swin": Family("SwinModel", "encoder.layers", "attention", (), staged="swin"),
    "hiera": Family("HieraModel", "encoder.stages", "attn", (), forward_kwargs=_INTERP, crop_ratio=1 / 0.9,
                    staged="hiera", patch="patch_stride", softmax_tap=True),
    "swinv2": Family("Swinv2Model", "encoder.layers", "attention", (), staged="swinv2"),
    # SamModel checkpoints name the encoder's tensors vision_encoder.*: SamVisionModel loads them
    "sam_vision_model": Family("SamVisionEncoder", "layers", "attn", (), staged="sam", loader="SamVisionModel",
                               processor="SamImageProcessor", resample=2, letterbox=True),
}
# multimodal model_type -> the attribute of its config that holds the vision encoder's config
VISION_SUBCONFIG = {"clip": "vision_config", "siglip": "vision_config", "sam": "vision_config"}

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
    "microsoft/swin-tiny-patch4-window7-224": ("SwinConfig", {}, {}),
    "facebook/hiera-tiny-224-hf": ("HieraConfig", dict(depths=[1, 2, 7, 2]), {}),
    "facebook/hiera-small-224-hf": ("HieraConfig", dict(depths=[1, 2, 11, 2]), {}),
    "facebook/hiera-base-224-hf": ("HieraConfig", {}, {}),
    "microsoft/swinv2-tiny-patch4-window8-256": ("Swinv2Config", dict(image_size=256, window_size=8), {}),
    "facebook/sam-vit-base": ("SamVisionConfig", {}, {}),  # the defaults are SAM's ViT-B image encoder
    "facebook/sam-vit-large": ("SamVisionConfig", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                       global_attn_indexes=[5, 11, 17, 23]), {}),
    "microsoft/beit-base-patch16-224": ("BeitConfig", dict(use_relative_position_bias=True,
                                                           use_absolute_position_embeddings=False,
                                                           layer_scale_init_value=0.1, use_mean_pooling=True), {}),
}


def known_defaults(repo: str | None) -> tuple[dict, dict]:
    """The config and processor defaults :data:`KNOWN` holds for ``repo`` (both empty for another repo or None)."""
    if repo is None or repo not in KNOWN:
        return {}, {}
    _, config, processor = KNOWN[repo]
    return config, processor


def family_of(config) -> Family | None:
    """The family of an encoder config (None: not one this adapter drives)."""
    return FAMILIES.get(getattr(config, "model_type", ""))


def vision_config(config):
    """The vision encoder's config inside a multimodal (CLIP, SigLIP) config, else ``config``."""
    sub = VISION_SUBCONFIG.get(getattr(config, "model_type", ""))
    return getattr(config, sub) if sub else config


def check_family(cfg, name: str) -> Family:
    """The family of ``cfg``, or an error naming the families this adapter knows."""
    fam = family_of(cfg)
    if fam is None:
        raise UnsupportedArchitectureError(
            f"{name!r} is a {getattr(cfg, 'model_type', '?')!r} model; the hf adapter knows "
            f"{', '.join(sorted(FAMILIES))} (and CLIP/SigLIP vision towers). Use another backend (timm:, "
            "open_clip:) or write an adapter.")
    return fam
