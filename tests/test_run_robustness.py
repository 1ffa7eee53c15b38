"""What a run does with bad numbers and bad files: NaN/inf are flagged (run.json, CLI, summary),
and an image that fails to decode mid-run is skipped and recorded, never costing the model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import probekit as pk
from probekit.cli import app
from probekit.api import compare
from probekit.errors import ProbekitError

TINY = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


@pytest.fixture
def nan_checkpoint(tmp_path):
    """A tiny timm ViT's weights with NaN in block 1's qkv projection (a diverged training run)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=3, num_heads=2)
    state = model.state_dict()
    state["blocks.1.attn.qkv.weight"][:] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    return path


def test_nan_weights_in_one_block_are_flagged_in_run_json_and_the_cli(tmp_path, nan_checkpoint, monkeypatch, run_file):
    broken = {"model": "timm:vit_tiny_patch16_224", "label": "broken",
              "options": {**TINY, "checkpoint": str(nan_checkpoint)}}
    run = run_file(name="nan", models=[broken], images={"path": "sample", "count": 3})
    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    r = CliRunner().invoke(app, ["compare", str(run), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["status"] == "nonfinite"  # not a silent "complete"
    # layers 1 and 2 see NaN (block 1's attention, then its NaN output): 2 layers x 2 heads x 3 images
    (found,) = rec["nonfinite"]
    assert (found["model"], found["metric"], found["values"], found["of"]) == ("broken", "mad", 12, 18)
    assert found["layers"] == [1, 2] and len(found["images"]) == 3
    err = " ".join(r.stderr.split())
    assert "Warning: 12 value(s) are NaN or infinite" in err
    assert "broken mad: 12 of 18 in layer(s) 1, 2 on 3 image(s)" in err
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert (summary[summary.layer == 0][["n", "n_nonfinite"]].to_numpy() == [3, 0]).all()
    assert (summary[summary.layer == 1][["n", "n_nonfinite"]].to_numpy() == [0, 3]).all()
    # the report's explorer is captured all the same (its NaN cast to uint8 once failed it: no explorer)
    assert rec["models"][0]["explorer"].startswith("parts/explorer/")


def test_nan_pixels_are_counted_in_the_summary_not_silently_dropped(toy_backend):
    pm = pk.load("toy:vit")
    x = torch.randn(3, 3, 32, 32)
    x[1, :, 5, 5] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    res = pk.probe(pm, x, ["mad"], batch_size=3)
    s = res.summary()
    assert (s["n"] == 1).all() and (s["n_nonfinite"] == 2).all()  # 3 images: 1 finite, 2 flagged
    clean = pk.probe(pm, x[:1], ["mad"]).summary()
    np.testing.assert_allclose(s["mean"], clean["mean"], rtol=1e-5)  # batch of 3 vs 1: float32 order
    assert [(f["images"], f["values"]) for f in res.nonfinite()] == [(["1", "2"], 2 * 2 * 2)]  # images x layers x heads


def _with_truncated_jpeg(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in pk.sample_images()[:4]:
        shutil.copy(p, folder / p.name)
    good = next(p for p in pk.sample_images() if p.suffix.lower() in (".jpg", ".jpeg"))
    data = good.read_bytes()
    (folder / "b_truncated.jpg").write_bytes(data[: len(data) // 2])  # a download cut short
    return folder


def test_a_truncated_jpeg_is_skipped_and_recorded_while_the_model_finishes(tmp_path, toy_backend, run_file):
    folder = _with_truncated_jpeg(tmp_path)
    run = run_file(images={"path": str(folder)}, batch_size=2)
    cmp = compare(run, out=tmp_path / "out")
    assert cmp.ok and cmp.status == "complete"
    names = sorted(p.name for p in folder.iterdir() if p.name != "b_truncated.jpg")
    assert sorted(cmp.results.table["image"].unique()) == names
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    (skipped,) = rec["images"]["skipped"]
    assert skipped == ["b_truncated.jpg", "cannot be decoded"]
    # the other images' values are the same as a run without the broken file, image by image
    torch.manual_seed(0)
    pm = pk.load("toy:vit")
    direct = pk.probe(pm, [folder / n for n in names], ["mad"], batch_size=2).table
    got = cmp.results.table.sort_values(["image", "layer", "head"]).reset_index(drop=True)
    want = direct.assign(image=direct["image"].map(lambda s: s.rsplit("/", 1)[-1]))
    want = want.sort_values(["image", "layer", "head"]).reset_index(drop=True)
    np.testing.assert_allclose(got["value"], want["value"], rtol=1e-5)  # other batches: float32 order


def test_strict_stops_a_truncated_jpeg_before_any_model_loads(tmp_path, toy_backend):
    folder = _with_truncated_jpeg(tmp_path)
    with pytest.raises(ProbekitError, match=r"b_truncated.jpg is not a readable image .*truncated.*drop --strict"):
        pk.resolve_images(folder, strict=True)
