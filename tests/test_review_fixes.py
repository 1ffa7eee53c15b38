"""Regression tests for defects found in review: each fails on the code before its fix.

- a tap whose attention raised before its SDPA call left the spy armed (a later SDPA call in the
  thread reported to the old sink);
- a preprocessed tensor already on the accelerator was handed to a pinning DataLoader;
- ``probe(layers=...)`` with indices the model does not have returned an empty table silently;
- the part cache served random-init parts drawn with another seed, and parts of a checkpoint
  file that has since been overwritten; a damaged arrays file gave a traceback;
- in-memory (PIL) image sets all had the same fingerprint whatever their pixels;
- the depth profile's uniform-attention line of ``mad[queries=cls]`` was the patch-query value;
- a dataset-level array (CKA's [L, L]) crashed the map figures, which cost a run all its figures,
  and ``render_all(metrics=...)`` / ``probekit plot --metric`` ignored or refused map metrics;
- CSV round trips failed on NaN values (head_similarity of a one-head layer).
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probekit as pk
from probekit.compare import compare, part_key
from probekit.errors import ConfigError
from probekit.images import ImageSet
from probekit.plugins.adapters._sdpa_spy import _PENDING, tap_blocks
from probekit.probe import _loader


class _FailingAttention(nn.Module):
    """Raises before its SDPA call while ``fail`` is set (as an out-of-memory error would)."""

    def __init__(self):
        super().__init__()
        self.fail = True

    def forward(self, x):
        if self.fail:
            raise RuntimeError("out of memory (simulated)")
        q = x[:, None]
        return F.scaled_dot_product_attention(q, q, q)[:, 0]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _FailingAttention()

    def forward(self, x):
        return self.attn(x)


class _Sink:
    layers = None
    wants_attention, wants_hidden = True, False

    def __init__(self):
        self.got = []

    def attention(self, layer, attn):
        self.got.append(layer)


def test_spy_is_disarmed_after_an_attention_that_raised():
    blocks, old = [_Block()], _Sink()
    with pytest.raises(RuntimeError, match="simulated"):
        with tap_blocks(blocks, old):
            blocks[0](torch.randn(2, 5, 4))
    assert _PENDING.report is None
    new = _Sink()
    with tap_blocks([], new):  # the spy is installed again; this SDPA call is outside any watched module
        q = torch.randn(1, 1, 5, 4)
        F.scaled_dot_product_attention(q, q, q)
    assert old.got == [] and new.got == []


def test_loader_does_not_pin_a_tensor_already_on_a_device():
    pm = types.SimpleNamespace(preprocess=None)
    on_device = ImageSet(names=["0", "1"], tensor=torch.empty(2, 3, 8, 8, device="meta"))
    on_host = ImageSet(names=["0", "1"], tensor=torch.zeros(2, 3, 8, 8))
    loader = _loader(pm, on_device, 2, 2, pin=True)
    assert loader.pin_memory is False and loader.num_workers == 0
    loader = _loader(pm, on_host, 2, 2, pin=True)
    assert loader.pin_memory is True and loader.num_workers == 2


def test_probe_refuses_layers_the_model_does_not_have(toy_backend):
    pm = pk.load("toy:vit", depth=2)
    x = torch.randn(2, 3, 32, 32)
    for bad in ([2], [0, -1]):
        with pytest.raises(ConfigError, match=r"has 2 layers, numbered 0 to 1"):
            pk.probe(pm, x, metrics=["mad"], layers=bad)
    res = pk.probe(pm, x, metrics=["mad"], layers=[1])
    assert sorted(res.table["layer"].unique()) == [1]


_RUN = """\
name: seeds
models:
  - model: toy:vit
    label: random
    options: {{pretrained: false}}
  - model: toy:vit
    label: trained
images: {{path: sample, count: 2}}
metrics: [mad]
batch_size: 2
seed: {seed}
figures: []
"""


def test_random_init_parts_are_not_reused_across_seeds(tmp_path, toy_backend):
    def run(seed):
        p = tmp_path / f"run{seed}.yaml"
        p.write_text(_RUN.format(seed=seed))
        return compare(p, out=tmp_path / "out", figures=False)

    a, b = run(0), run(1)
    assert b.cached == ["trained"]  # only the random-init model depends on the seed
    t = b.results.table
    va = a.results.table[a.results.table["model"].astype(str) == "random"]["value"].to_numpy()
    vb = t[t["model"].astype(str) == "random"]["value"].to_numpy()
    assert abs(va - vb).max() > 1e-3  # other weights, other numbers
    assert run(0).cached == ["random", "trained"]


def test_part_key_follows_the_checkpoint_file_contents(tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"epoch 1")
    metric = pk.metrics.get("mad")()
    opts = {"checkpoint": str(ckpt)}
    before = part_key("timm:vit_small_patch16_224", opts, "fp", metric, "torch.float32")
    assert part_key("timm:vit_small_patch16_224", opts, "fp", metric, "torch.float32") == before
    ckpt.write_bytes(b"epoch 10, more training")
    os.utime(ckpt, ns=(1, 1))  # also when the clock says nothing changed: the size did
    assert part_key("timm:vit_small_patch16_224", opts, "fp", metric, "torch.float32") != before


def test_fingerprint_of_in_memory_images_follows_their_pixels():
    from PIL import Image

    black = pk.resolve_images([Image.new("RGB", (8, 8), (0, 0, 0))]).fingerprint()
    white = pk.resolve_images([Image.new("RGB", (8, 8), (255, 255, 255))]).fingerprint()
    assert black != white
    assert pk.resolve_images([Image.new("RGB", (8, 8), (0, 0, 0))]).fingerprint() == black


@pytest.mark.parametrize("units", ["px", "fraction"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_uniform_reference_line_matches_mad_of_uniform_attention_for_cls_queries(units, renormalize):
    from probekit.plots_common import _reference
    from probekit.results import Results

    lay = pk.TokenLayout(num_prefix=2, grid=(3, 5), patch_size=(8, 16), prefix_kinds=("cls", "dist"))
    mad = pk.metrics.get("mad")(queries="cls", units=units, renormalize=renormalize)
    t = lay.num_tokens
    expected = mad.compute(torch.full((1, 1, t, t), 1 / t), lay).item()
    meta = {"model": "m", "layout": {"num_prefix": 2, "grid": [3, 5], "patch_size": [8, 16]},
            "metrics": {mad.label: {"name": "mad", "options": mad.options()}}}
    table = {"model": ["m"], "image": ["a"], "layer": [0], "head": [0], "metric": [mad.label], "value": [1.0]}
    import pandas as pd

    assert _reference(Results(pd.DataFrame(table), meta=meta), "m", mad.label) == pytest.approx(expected, rel=1e-6)


_CKA_RUN = """\
name: cka
models: [toy:vit]
images: {path: sample, count: 4}
metrics: [mad, cka]
batch_size: 4
figures: [depth, maps]
"""


def test_a_dataset_level_array_does_not_cost_the_figures(tmp_path, toy_backend):
    pytest.importorskip("seaborn")
    p = tmp_path / "run.yaml"
    p.write_text(_CKA_RUN)
    cmp = compare(p, out=tmp_path / "out")
    assert cmp.figure_error is None
    assert sorted(f.name for f in cmp.figures) == ["depth_mad.png", "depth_mad.svg"]
    assert cmp.results.arrays["toy:vit/cka"].shape == (2, 2)


def test_render_all_draws_only_the_metrics_asked_for(tmp_path, toy_backend):
    pytest.importorskip("seaborn")
    from probekit import plots

    res = pk.probe(pk.load("toy:vit", depth=2), torch.randn(2, 3, 32, 32), metrics=["mad", "cls_map"])
    only_mad = plots.render_all(res, tmp_path / "a", kinds=["depth", "maps"], metrics=["mad"])
    assert sorted(f.name for f in only_mad) == ["depth_mad.png", "depth_mad.svg"]
    only_map = plots.render_all(res, tmp_path / "b", kinds=["depth", "maps"], metrics=["cls_map"])
    assert sorted(f.name for f in only_map) == ["maps_cls_map.png", "maps_cls_map.svg"]


def test_plot_command_selects_a_map_metric(tmp_path, toy_backend, monkeypatch):
    pytest.importorskip("seaborn")
    from pathlib import Path

    from typer.testing import CliRunner

    from probekit.cli import app

    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    run = CliRunner()
    out = tmp_path / "run"
    r = run.invoke(app, ["run", "toy:vit", "--count", "2", "--metric", "mad", "--metric", "cls_map",
                         "--out", str(out), "--no-figures"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["plot", str(out), "--metric", "cls_map"])
    assert r.exit_code == 0, r.output
    assert sorted(Path(line).name for line in r.stdout.split()) == ["maps_cls_map.png", "maps_cls_map.svg"]


def test_csv_round_trips_nan_values_and_na_names(tmp_path):
    import numpy as np
    import pandas as pd

    from probekit.results import Results

    table = pd.DataFrame({"model": ["NA", "NA"], "image": ["a", "None"], "layer": [0, 0], "head": [0, 1],
                          "metric": ["head_similarity"] * 2, "value": [np.nan, 0.25]})
    res = Results(table)
    back = Results.read_csv(res.to_csv(tmp_path / "r.csv"))
    pd.testing.assert_frame_equal(back.table, res.table)


_MAP_RUN = """\
name: maps
models: [toy:vit]
images: {path: sample, count: 2}
metrics: [cls_map]
batch_size: 2
figures: []
"""


def test_a_damaged_arrays_file_is_recomputed_not_a_traceback(tmp_path, toy_backend):
    import numpy as np

    p = tmp_path / "run.yaml"
    p.write_text(_MAP_RUN)
    first = compare(p, out=tmp_path / "out", figures=False)
    (npz,) = (tmp_path / "out" / "parts").glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:40])  # truncated (a disk error, a copy cut short)
    again = compare(p, out=tmp_path / "out", figures=False)
    assert again.cached == []
    np.testing.assert_array_equal(again.results.arrays["toy:vit/cls_map"], first.results.arrays["toy:vit/cls_map"])


def test_map_figures_are_drawn_for_patch_grid_maps_only(tmp_path, toy_backend):
    pytest.importorskip("seaborn")
    from probekit import plots

    res = pk.probe(pk.load("toy:vit", depth=2), torch.randn(4, 3, 32, 32),
                   metrics=["cls_map", "distance_profile", "cka"], batch_size=4)
    assert res.arrays["toy:vit/distance_profile"].ndim == 4  # [images, layers, heads, bins]: no image
    paths = plots.render_all(res, tmp_path, kinds=["maps"])
    assert sorted(p.name for p in paths) == ["maps_cls_map.png", "maps_cls_map.svg"]
