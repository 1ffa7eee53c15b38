"""Bad inputs get one line that says what to do (issue 10, "raw tracebacks"); odd ones are converted."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import probekit as pk
from probekit.errors import ConfigError, ImageError, UnknownNameError
from probekit.inputs.images import resolve_images

pytestmark = pytest.mark.usefixtures("toy_backend")


@pytest.fixture
def toy():
    return pk.load("toy:vit", pretrained=False, image_size=16, patch_size=8, depth=2)


def _pixels(n=2, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# -- Python API arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, says", [
    ({"batch_size": 0}, ConfigError, "batch_size must be a positive whole number; got 0"),
    ({"batch_size": 2.5}, ConfigError, "batch_size must be a positive whole number; got 2.5"),
    ({"batch_size": "4"}, ConfigError, "batch_size must be a positive whole number; got '4'"),
    ({"num_workers": -1}, ConfigError, "num_workers must be a whole number >= 0"),
    ({"block_mb": 0}, ConfigError, "block_mb must be a positive number of MiB"),
    ({"device": "gpu"}, ConfigError, "'gpu' is not a device; use cpu, cuda, cuda:N or mps"),
    ({"device": "cuda"}, ConfigError, "torch sees no CUDA GPU here; use cpu"),
    ({"images": 42}, ImageError, "images= takes a folder, file paths, 'sample', PIL images, a NumPy array or a tensor; got int"),
    ({"images": [42]}, ImageError, "images= items must be paths (or all PIL images); got int"),
    ({"images": torch.zeros(1, 3, 16, 16, dtype=torch.int64)}, ImageError, "must be float (preprocessed"),
    ({"metrics": None}, ConfigError, "metrics=None names no metric; pass at least one, e.g. metrics=['mad']"),
    ({"metrics": []}, ConfigError, "names no metric"),
    ({"layers": "12"}, ConfigError, "not the string '12'"),
    ({"layers": []}, ConfigError, "layers=[] selects no layer"),
    ({"layers": [0.5]}, ConfigError, "whole-number layer indices such as [0, 11]; got 0.5"),
    ({"model": None}, ConfigError, "model= takes a ProbedModel (from pk.load or pk.wrap) or an alias/spec"),
])
def test_bad_probe_arguments_say_what_is_expected(toy, monkeypatch, kwargs, error, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    args = {"model": toy, "images": _pixels(), "metrics": ["mad"], **kwargs}
    with pytest.raises(error) as err:
        pk.probe(args.pop("model"), args.pop("images"), args.pop("metrics"), **args)
    assert says in str(err.value), str(err.value)


def test_load_checks_the_device_first(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'gpu' is not a device; use cpu, cuda, cuda:N or mps"):
        pk.load("toy:vit", device="gpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU here; use cpu"):
        pk.load("toy:vit", device="cuda")


@pytest.mark.parametrize("name", [None, "", 42])
def test_load_needs_a_name(name):
    with pytest.raises(ConfigError, match="A model is named by a string: an alias from `probekit models`"):
        pk.load(name)


def test_tensors_and_arrays_of_other_dtypes_are_converted(toy):
    pix = _pixels()
    ref = pk.probe(toy, [Image.fromarray(p) for p in pix]).table.value.to_numpy()  # the PIL path
    for images in (pix, torch.from_numpy(pix), torch.from_numpy(pix).permute(0, 3, 1, 2)):  # raw uint8 pixels
        np.testing.assert_array_equal(pk.probe(toy, images).table.value.to_numpy(), ref)
    x = torch.randn(2, 3, 16, 16)
    ref = pk.probe(toy, x).table.value.to_numpy()
    np.testing.assert_allclose(pk.probe(toy, x.double()).table.value.to_numpy(), ref, rtol=1e-6)  # today: raw dtype error
    np.testing.assert_allclose(pk.probe(toy, x.numpy()).table.value.to_numpy(), ref, rtol=1e-6)
    half = pk.probe(toy, x.half()).table.value.to_numpy()
    np.testing.assert_allclose(half, pk.probe(toy, x.half().float()).table.value.to_numpy(), rtol=1e-6)
    one = pk.probe(toy, x, layers=1).table  # one index is a list of one
    assert set(one.layer) == {1}


# -- files ---------------------------------------------------------------------------------------
def _png(path, seed=0):
    Image.fromarray(_pixels(1, seed=seed)[0]).save(path, format="PNG")


def test_non_utf8_file_names_are_probed_and_written(toy, tmp_path):
    _png(tmp_path / "ok.png")
    with open(os.path.join(os.fsencode(tmp_path), b"\xffraw.png"), "wb") as f:
        _png(f, seed=1)
    res = pk.probe(toy, tmp_path)  # today: UnicodeEncodeError in the image-set fingerprint
    assert set(res.table.image) == {"ok.png", "\\xffraw.png"}
    back = pk.Results.read_parquet(res.to_parquet(tmp_path / "r.parquet"))
    assert set(back.table.image) == {"ok.png", "\\xffraw.png"}


def test_images_over_the_decompression_bomb_limit_are_skipped_and_recorded(toy, tmp_path, monkeypatch):
    _png(tmp_path / "small.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice that: PIL refuses it
    res = pk.probe(toy, tmp_path)  # today: DecompressionBombError stops the whole run
    assert set(res.table.image) == {"small.png"}
    reason = dict(res.meta["images"]["skipped"])["huge.png"]
    assert reason.startswith("too large") and "PIL.Image.MAX_IMAGE_PIXELS = None" in reason


def test_not_an_image_broken_links_and_damaged_images_are_told_apart(tmp_path, caplog):
    _png(tmp_path / "ok.png")
    (tmp_path / "text.jpg").write_text("not a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    whole = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    os.symlink("nowhere.png", tmp_path / "dangling.png")
    os.symlink("loop_b.png", tmp_path / "loop_a.png")
    os.symlink("loop_a.png", tmp_path / "loop_b.png")
    with caplog.at_level(logging.WARNING, logger="probekit.inputs.images"):
        s = resolve_images(tmp_path)
    why = dict(s.skipped)
    assert s.names == ["ok.png"]
    assert why["text.jpg"].startswith("not an image") and why["notes.txt"] == "not an image suffix"
    assert why["cut.png"].startswith("unreadable: ")
    for link in ("dangling.png", "loop_a.png", "loop_b.png"):  # today: dropped without a record
        assert why[link].startswith("broken link"), why
    assert "Skipped 1 file(s) that are not images: text.jpg" in caplog.text
    assert "Skipped 1 unreadable image(s): cut.png" in caplog.text
    os.remove(tmp_path / "ok.png")
    with pytest.raises(ImageError) as err:
        resolve_images(tmp_path)
    msg = str(err.value)
    assert msg.startswith("The image set is empty (skipped: ") and "Point --images at a folder with images" in msg
    for part in ("2 file(s) that are not images", "1 unreadable image(s)", "3 broken link(s)"):
        assert part in msg, msg


# -- model files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, says", [
    (b"", "is empty (0 bytes), not an ONNX model"),  # today: "no Softmax node"
    (b"hello, I am a text file", "is not an ONNX model (onnx cannot parse it"),  # today: raw DecodeError
])
def test_files_that_are_not_onnx_say_so(tmp_path, content, says):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        pk.load(f"onnx:{path}")
    assert says in str(err.value) and "torch.onnx.export" in str(err.value)


@pytest.mark.parametrize("spec, options", [
    ("timm:vit_small_patch16_224", {"embed_dim": 32, "depth": 1, "num_heads": 2}),
    ("hf:google/vit-base-patch16-224", {"config": {"hidden_size": 32, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2, "intermediate_size": 64}}),
])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_garbage_checkpoint_is_one_line(tmp_path, spec, options, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ConfigError) as err:  # today: raw UnpicklingError / SafetensorError
        pk.load(spec, checkpoint=str(path), **options)
    msg = str(err.value)
    assert msg.startswith(f"checkpoint={str(path)!r} cannot be loaded (") and "saved from this architecture" in msg


def test_unknown_hf_repo_does_not_suggest_what_was_given():
    with pytest.raises(UnknownNameError) as err:
        pk.load("hf:nobody/no-such-vit", pretrained=False)
    assert "pretrained=False" not in str(err.value) and "hf download nobody/no-such-vit" in str(err.value)


# -- the command line ----------------------------------------------------------------------------
@pytest.fixture
def cli(run_cli):
    return run_cli


def test_missing_onnx_file_does_not_suggest_no_pretrained(cli, tmp_path):
    r = cli("inspect", f"onnx:{tmp_path}/absent.onnx")
    assert r.exit_code == 1 and "No ONNX file at" in r.output
    assert "--no-pretrained" not in r.output  # which ONNX refuses


def test_plot_and_read_parquet_refuse_foreign_tables(cli, tmp_path):
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_parquet(tmp_path / "results.parquet")
    with pytest.raises(ConfigError, match=r"is not a probekit results table: it lacks column\(s\) model, image"):
        pk.Results.read_parquet(tmp_path / "results.parquet")
    r = cli("plot", tmp_path)  # a directory probekit did not write: one line, whichever check sees it first
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "Traceback" not in r.output
    (tmp_path / "results.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="cannot be read as parquet"):
        pk.Results.read_parquet(tmp_path / "results.parquet")
    bad = pd.DataFrame({"model": ["m"], "image": ["i"], "layer": ["x"], "head": [0], "metric": ["mad"], "value": [1.0]})
    bad.to_parquet(tmp_path / "results.parquet")
    with pytest.raises(ConfigError, match="is not a probekit results table: "):
        pk.Results.read_parquet(tmp_path / "results.parquet")


@pytest.mark.parametrize("seed", range(12))
def test_garbage_that_torch_reads_as_a_broken_pickle_is_never_called_code_nor_shown_torchs_advice(tmp_path, seed):
    """Random bytes fail torch's weights-only loader in several ways (an unsupported opcode, an
    IndexError); none asks for a class or function, so none is "a pickle that holds more than tensors",
    and no message repeats torch's advice to load with weights_only off."""
    path = tmp_path / "weights.pth"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 256, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError) as err:
        pk.load("timm:vit_small_patch16_224", checkpoint=str(path), embed_dim=32, depth=1, num_heads=2)
    msg = str(err.value)
    assert msg.startswith(f"checkpoint={str(path)!r} cannot be loaded (") and "weights_only" not in msg
