"""Building a transformers encoder: its config (local directory, HF cache, then :data:`KNOWN`),
pretrained weights, or a local state-dict file loaded through ``from_pretrained``; errors that
say where the weights should be and how to get them there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from probekit.errors import ConfigError, UnknownNameError, WeightsUnavailableError, reading_checkpoint, refusing_pickles

from ._hf_families import KNOWN, check_family, vision_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["config_for", "pretrained_model", "load_checkpoint", "hub_hint", "local_model_files"]


def known_config(repo: str, overrides: dict):
    import transformers

    cls_name, kwargs, _ = KNOWN[repo]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def hub_hint(repo: str, random_init: bool = True) -> str:
    """Where the weights would come from; offers pretrained=False only where it would help (a
    random init needs the config, which only a cached or known repo has)."""
    from huggingface_hub import constants

    alt = "or pass pretrained=False for a random-init control " if random_init else ""
    return (f"The Hugging Face cache is {constants.HF_HUB_CACHE}. On a connected machine run "
            f"`hf download {repo}` (or `huggingface-cli download {repo}`) and copy the cache here{',' * bool(alt)} "
            f"{alt}(HF_HUB_OFFLINE=1 skips network retries).")


def config_for(name: str, overrides: dict | PretrainedConfig):
    """The encoder config of ``name``: a local directory, the HF cache, then :data:`KNOWN`."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(overrides, PretrainedConfig):
        return vision_config(overrides)
    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if Path(name).is_dir():
            raise ConfigError(f"{name!r} is a directory without a readable config.json: {exc}") from exc
        if name not in KNOWN:
            raise UnknownNameError("transformers model", name, KNOWN, hint=(
                "It is neither a local directory, nor in the Hugging Face cache, nor a repo id probekit "
                "knows offline. " + hub_hint(name, random_init=False))) from None
        return known_config(name, overrides)
    cfg = vision_config(cfg)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def pretrained_model(name: str, overrides: dict | PretrainedConfig) -> nn.Module:
    """Weights from a local directory or the HF cache (downloading only when the hub is online).

    A ``.bin`` pickle that torch refuses under ``weights_only`` is one line, not torch's advice
    to load it unsafely.
    """
    with refusing_pickles(f"A weights file of hf:{name}"):
        return _pretrained_model(name, overrides)


def _pretrained_model(name: str, overrides: dict | PretrainedConfig) -> nn.Module:
    import transformers
    from huggingface_hub import constants

    tries = [True] if (constants.HF_HUB_OFFLINE or Path(name).is_dir()) else [True, False]
    error: Exception | None = None
    for local in tries:
        try:
            if isinstance(overrides, transformers.PretrainedConfig):
                cfg = vision_config(overrides)
            else:
                cfg = vision_config(transformers.AutoConfig.from_pretrained(name, local_files_only=local))
                for key, value in overrides.items():
                    setattr(cfg, key, value)
            fam = check_family(cfg, name)
            return getattr(transformers, fam.loader or fam.model_class).from_pretrained(
                name, config=cfg, local_files_only=local, dtype=torch.float32)
        except (OSError, ValueError) as exc:  # missing files, or no network
            error = exc
    if name not in KNOWN and not Path(name).is_dir():
        raise UnknownNameError("transformers model", name, KNOWN, hint=hub_hint(name, random_init=False)) from None
    raise WeightsUnavailableError(
        f"Pretrained weights for {name!r} are not on this machine and cannot be downloaded now "
        f"({type(error).__name__}). {hub_hint(name)}") from error


def load_checkpoint(model_class, cfg, path: str) -> nn.Module:
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
    with tempfile.TemporaryDirectory(prefix="probekit-hf-") as tmp, reading_checkpoint(path):
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
    fam = check_family(model.config, path)  # the family of cfg, which the caller checked
    missing = [k for k in info.get("missing_keys", ()) if f".{fam.blocks}." in f".{k}" or "embed" in k]
    if missing:
        raise ConfigError(f"checkpoint {path!r} lacks {len(missing)} of the encoder's tensors (e.g. "
                          f"{', '.join(sorted(missing)[:3])}); is it for this architecture and size?")
    return model


def local_model_files(name: str) -> list[Path]:
    """The files a model named ``name`` is read from on this machine, for cache keys.

    A local directory: its files (config, weights, preprocessing). A hub repo id: the files of
    the snapshot the Hugging Face cache resolves it to now (a refreshed download is another
    snapshot, and its blobs are named by content). Nothing when the repo is not cached.
    """
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not cached (or not a repo id): the load says what to do
            return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
