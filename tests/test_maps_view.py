"""The maps figure draws each map over the image as its model preprocessed it (EXIF rotation,
resize, centre crop), from the run directory alone: never over the raw file squashed to a square.

A tiny random-init timm ViT (32 px, 8 px patches; timm resizes to 35 px and centre-crops 32) on a
48 x 32 photo whose EXIF orientation (6) says "rotate 90 degrees": the model sees a portrait,
centre-cropped square.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import probekit as pk
from probekit.views import plots
from probekit.api import compare
from probekit.inputs.view import VIEW_IMAGES, view_key
from probekit.runs.rundir import load_run_dir

pytest.importorskip("timm")
pytest.importorskip("seaborn")

TIMM = "timm:vit_tiny_patch16_224"
OPTS = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _photo(path):
    """A 48 x 32 picture with a different colour in each corner, stored with EXIF orientation 6."""
    y, x = np.mgrid[:32, :48]
    a = np.stack([x * 5, y * 7, (x < 24) * 200 + (y < 16) * 50], -1).clip(0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif)


def _stretched(x: torch.Tensor) -> np.ndarray:
    """The model's input [3, H, W] with each channel stretched back to 0..255 (its normalisation undone)."""
    a = x.numpy().astype(np.float64)
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    return np.rint((a - lo) / (hi - lo) * 255).astype(np.uint8).transpose(1, 2, 0)


@pytest.fixture
def run_dir(tmp_path, run_file):
    (tmp_path / "imgs").mkdir()
    _photo(tmp_path / "imgs" / "rotated.png")
    run = run_file(name="view", models=[{"model": TIMM, "label": "tiny", "options": OPTS}],
                   images=str(tmp_path / "imgs"), metrics=["cls_map"], figures=["maps"])
    compare(run, out=tmp_path / "out", report=False)
    return tmp_path


def test_maps_are_drawn_over_the_models_preprocessed_view_from_the_run_dir_alone(run_dir):
    path = run_dir / "imgs" / "rotated.png"
    pm = pk.load(TIMM, **OPTS)
    with Image.open(path) as im:
        seen = _stretched(pm.preprocess(ImageOps.exif_transpose(im).convert("RGB")))
        squashed = np.asarray(im.convert("RGB").resize(seen.shape[1::-1]))
    assert seen.shape == (32, 32, 3)

    res = load_run_dir(run_dir / "out")  # what `probekit plot` draws from: no model loaded
    stored = res.arrays[view_key("tiny")]
    assert stored.dtype == np.uint8 and stored.shape == (1, 32, 32, 3)
    _, axes = plots.attention_maps(res, "cls_map")
    background = np.asarray(axes[0, 0].get_images()[0].get_array())
    np.testing.assert_array_equal(background, seen)
    assert np.abs(background.astype(int) - squashed.astype(int)).mean() > 20  # not the raw file squashed
    grid = axes[0, 0].get_images()[1]  # the map over it, covering the model's input
    assert grid.get_array().shape == (4, 4) and tuple(grid.get_extent()) == (0, 32, 32, 0)


def test_a_rerun_served_from_cache_draws_over_the_same_view(run_dir):
    first = load_run_dir(run_dir / "out").arrays[view_key("tiny")]
    again = compare(run_dir / "run.yaml", out=run_dir / "out", report=False)
    assert again.cached == ["tiny"]  # no model loaded: the view comes with the cached part
    np.testing.assert_array_equal(again.results.arrays[view_key("tiny")], first)


def test_the_view_is_stored_for_the_first_images_only_and_without_pickle(run_dir, toy_backend):
    res = pk.probe(pk.load("toy:vit"), torch.randn(6, 3, 32, 32), metrics=["cls_map", "mad"], batch_size=4)
    view = res.arrays[view_key("toy:vit")]
    assert view.shape == (VIEW_IMAGES, 32, 32, 3) and view.dtype == np.uint8
    res.save_arrays(run_dir / "a.npz")
    with np.load(run_dir / "a.npz", allow_pickle=False) as z:  # plain arrays
        assert any(z[k].dtype == np.uint8 for k in z.files)
    # a scalar metric alone stores no view
    assert not pk.probe(pk.load("toy:vit"), torch.randn(2, 3, 32, 32), metrics=["mad"]).arrays


def test_each_map_is_titled_with_its_own_image_when_an_earlier_image_fails_to_decode(tmp_path):
    """Map rows are the decoded images, in order: a truncated first file shifts no title."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    good = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(good).save(imgs / "a_broken.jpg")
    (imgs / "a_broken.jpg").write_bytes((imgs / "a_broken.jpg").read_bytes()[:200])  # decodes no pixel
    for name, shift in (("b.png", 0), ("c.png", 60)):
        Image.fromarray((good.astype(int) + shift).clip(0, 255).astype(np.uint8)).save(imgs / name)
    res = pk.probe(pk.load(TIMM, **OPTS), imgs, metrics=["cls_map"], batch_size=3)
    assert [s[0] for s in res.meta["images"]["skipped"]] == ["a_broken.jpg"]
    _, axes = plots.attention_maps(res, "cls_map")
    assert [a.get_title() for a in axes[0]] == ["b.png", "c.png"]
