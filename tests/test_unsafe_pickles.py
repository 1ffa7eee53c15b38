"""Weights files that are pickles of more than tensors (issue 19, item 13).

torch refuses them under ``weights_only=True`` and then advises re-running with
``weights_only=False``: advice to run a stranger's code. probekit says in one line what the file
holds and what to do instead, for an ``hf:`` folder and for ``checkpoint=`` alike, and nothing in
the file runs (the pickle would create a marker file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import probekit as pk
from probekit.errors import ConfigError

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 8}
ROOT = Path(__file__).resolve().parents[1]


class _Planted:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _hostile_state_dict(sd: dict, marker: Path) -> dict:
    return {**sd, "extra": _Planted(marker)}


def _assert_safe_one_line(exc: BaseException, marker: Path) -> None:
    msg = str(exc)
    assert "\n" not in msg.strip(), msg
    assert not re.search(r"weights_only|allow_pickle|will likely succeed", msg), msg
    assert "posix.system" in msg or "os.system" in msg  # what the file tried to load, named
    assert exc.__cause__ is None and exc.__suppress_context__  # torch's advice is not chained on
    assert not marker.exists()


def test_an_hf_folder_with_a_code_pickle_is_one_line_without_unsafe_advice(tmp_path):
    import transformers

    cfg = transformers.ViTConfig(**TINY)
    d = tmp_path / "model"
    cfg.save_pretrained(d)
    marker = tmp_path / "PWNED"
    torch.save(_hostile_state_dict(transformers.ViTModel(cfg).state_dict(), marker), d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pytorch_model.bin|hf:") as err:
        pk.load(f"hf:{d}")
    _assert_safe_one_line(err.value, marker)


def test_a_checkpoint_with_a_code_pickle_is_one_line_without_unsafe_advice(tmp_path):
    import transformers

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "weights.bin"
    torch.save(_hostile_state_dict(transformers.ViTModel(transformers.ViTConfig(**TINY)).state_dict(), marker), ckpt)
    with pytest.raises(ConfigError, match=r"checkpoint=") as err:
        pk.load("hf:google/vit-base-patch16-224", checkpoint=str(ckpt), config=TINY)
    _assert_safe_one_line(err.value, marker)


def test_the_cli_prints_one_line_without_unsafe_advice(tmp_path, run_cli):
    import transformers

    cfg = transformers.ViTConfig(**TINY)
    d = tmp_path / "model"
    cfg.save_pretrained(d)
    marker = tmp_path / "PWNED"
    torch.save(_hostile_state_dict(transformers.ViTModel(cfg).state_dict(), marker), d / "pytorch_model.bin")
    out = run_cli("inspect", f"hf:{d}")
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit)  # an error message, not a crash
    first = out.output.splitlines()[0]
    assert first.startswith("Error:") and "system" in first
    assert "Traceback" not in out.output and "weights_only" not in out.output
    assert not marker.exists()


def _sources() -> list[Path]:
    return sorted([*(ROOT / "probekit").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def test_no_source_advises_or_uses_unsafe_loading():
    bad = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|weights_only` set to `False|"
                     r"pd\.read_pickle|yaml\.unsafe_load|yaml\.(Unsafe|Full)?Loader\b|pickle\.loads?\(|"
                     r"(?<![.\w])(eval|exec)\(|marshal\.loads|shelve\.|joblib\.load|dill\.|trust_remote_code\s*=\s*True")
    hits = []
    for f in _sources():
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if bad.search(line) and f.relative_to(ROOT).as_posix() != "probekit/runs/engines/stages.py" \
                    and not (f.name == "ray.py" and "payload" in line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []


def test_every_yaml_load_uses_a_safe_loader():
    import importlib

    import yaml

    for f in _sources():
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"\byaml\.load\(.*?Loader=([\w.]+)", text):
            rel = f.relative_to(ROOT).with_suffix("").parts
            module = importlib.import_module(".".join(("probekit", *rel) if rel[0] == "plugins" else rel))
            loader = getattr(module, m.group(1).rsplit(".", 1)[-1])
            assert issubclass(loader, yaml.SafeLoader), f"{'/'.join(rel)}: {m.group(0)}"
        assert not re.search(r"\byaml\.load\((?![^)]*Loader=)", text), f"{f}: yaml.load without a Loader"


def test_every_torch_load_is_weights_only_and_every_np_load_refuses_pickles():
    hits = []
    for f in _sources():
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"\b(torch\.load|np\.load)\(", text):
            depth, end = 1, m.end()
            while depth:  # to the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[m.start(): end]
            need = "weights_only=True" if m.group(1) == "torch.load" else "allow_pickle=False"
            if need not in call:
                hits.append(f"{f.relative_to(ROOT)}: {call}")
    assert hits == []
