"""The report's attention explorer: its stored maps against the model's own attention (every query),
recorded in the probing pass with no forward pass of its own, and one colour scale per image and layer
shared by every model in the page. (The browser draws it in tests/test_report_browser.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.api import compare
from probekit.runs import explorer

pytestmark = pytest.mark.usefixtures("toy_backend")

HALF_CODE = 0.5 / explorer.LEVELS + 1e-6  # a code is within half a step of sqrt(p) (float32 rounding aside)


def _sqrt(p: torch.Tensor) -> np.ndarray:
    return np.sqrt(p.double().clamp(0, 1).numpy())


def _check_against_model(pm, imgs, got, names=None):
    """Every stored row, CLS (or mean) row and rollout map equals the model's attention, to half a code."""
    from probekit.plugins.metrics.maps import rollout

    names = list(imgs.names) if names is None else names
    ds = imgs.dataset(pm.preprocess)
    for k, name in enumerate(names):
        _, x = ds[imgs.names.index(name)]
        want = pm.attention(x[None])  # {layer: [1, H, T, T]}, the reference path
        lay = pm.layout(x[None])
        n = lay.num_prefix
        q = got["queries"]
        for layer in range(pm.num_layers):
            p = want[layer][0]
            assert np.abs(got["attn"][k, layer] / explorer.LEVELS - _sqrt(p[:, n + q, n:])).max() <= HALF_CODE
            ref = p[:, lay.prefix_kinds.index("cls"), n:] if str(got["query"]) == "cls" else p[:, n:, n:].mean(1)
            assert np.abs(got["cls"][k, layer] / explorer.LEVELS - _sqrt(ref)).max() <= HALF_CODE
        roll = torch.stack([r[0].reshape(-1) for r in rollout([want[i] for i in range(pm.num_layers)], lay,
                                                                 query=str(got["query"]))])
        assert np.abs(got["rollout"][k] / explorer.LEVELS - _sqrt(roll)).max() <= HALF_CODE


def test_query_stride_fits_the_budget():
    # 16x16 grid, 12 layers x 6 heads: a query costs 72 * 256 bytes; 64 queries (stride 2) fit 1.2 MB
    assert explorer.query_stride((16, 16), 12, 6, 72 * 256 * 256) == 1
    assert explorer.query_stride((16, 16), 12, 6, 72 * 256 * 64) == 2
    assert explorer.query_stride((16, 16), 12, 6, 72 * 256 * 63) == 3


def test_codes_decode_to_the_probabilities():
    p = np.array([0.0, 1e-6, 1 / 256, 0.0625, 0.5, 1.0])
    codes = explorer._code(torch.tensor(p, dtype=torch.float32))
    # 63 * sqrt(p) = 0, 0.063, 3.94, 15.75, 44.55, 63
    assert explorer.LEVELS == 63 and codes.dtype == np.uint8 and codes.tolist() == [0, 0, 4, 16, 45, 63]
    assert np.abs(np.sqrt(explorer.decode(codes)) - np.sqrt(p)).max() <= HALF_CODE
    # a diverged model's NaN and inf are 0, not an undefined cast
    assert explorer._code(torch.tensor([float("nan"), float("inf"), -1.0, 2.0])).tolist() == [0, 0, 0, 63]


def test_capture_stores_every_query_as_the_model_attends():
    torch.manual_seed(0)
    pm = pk.load("toy:vit", depth=3, heads=4, prefix=1)
    imgs = pk.resolve_images("sample", count=2, seed=1)
    got = explorer.capture(pm, imgs, budget_bytes=10**6)
    assert got["attn"].dtype == np.uint8 and got["attn"].shape == (2, 3, 4, 16, 16)
    assert got["queries"].tolist() == list(range(16)) and str(got["query"]) == "cls"  # all 16 of the 4x4 grid
    _check_against_model(pm, imgs, got)
    # no CLS token: the mean query's row (as the cls_map metric's query="mean")
    pm0 = pk.load("toy:vit", depth=2, heads=2, prefix=0)
    got0 = explorer.capture(pm0, imgs, budget_bytes=10**6)
    assert str(got0["query"]) == "mean"
    _check_against_model(pm0, imgs, got0)
    # a small budget stores a sub-grid: every 2nd patch of the 4x4 grid
    sub = explorer.capture(pm, imgs, budget_bytes=3 * 4 * 16 * 4 * 2)
    assert sub["queries"].tolist() == [0, 2, 8, 10]
    np.testing.assert_array_equal(sub["attn"], got["attn"][:, :, :, [0, 2, 8, 10]])


def test_the_probing_pass_records_the_showcase_without_a_pass_of_its_own(monkeypatch):
    torch.manual_seed(0)
    pm = pk.load("toy:vit", depth=3, heads=4, prefix=1)
    imgs = pk.resolve_images("sample", count=5, seed=1)
    showcase = [imgs.names[3], imgs.names[1], imgs.names[4]]  # out of order, across batches
    rec = explorer.Recorder([imgs.names.index(n) for n in showcase], showcase, pm.num_layers, pm.num_heads, 10**6)
    forwards = []
    real = pm.adapter.forward
    monkeypatch.setattr(pm.adapter, "forward", lambda x: forwards.append(len(x)) or real(x))
    res = pk.probe(pm, imgs, ["mad"], batch_size=2, observer=rec)
    assert forwards == [2, 2, 1]  # the probe's batches only
    assert rec.error is None and rec.seconds > 0
    got = rec.arrays()
    assert got is not None and got["names"].tolist() == showcase
    _check_against_model(pm, imgs, got, names=showcase)
    # the numbers are the probe's own, observer or not
    plain = pk.probe(pm, imgs, ["mad"], batch_size=2)
    np.testing.assert_array_equal(res.table["value"].to_numpy(), plain.table["value"].to_numpy())


def test_a_model_it_cannot_draw_is_its_failure_not_the_probes():
    from probekit_tests_windowed import build

    pm = build("swin")  # windowed layers: the explorer draws global attention only
    x = torch.randn(3, 3, 56, 56)
    rec = explorer.Recorder([1], ["b"], pm.num_layers, pm.num_heads, 10**6)
    res = pk.probe(pm, x, ["mad"], batch_size=3, observer=rec)
    assert isinstance(rec.error, ValueError) and "global attention only" in str(rec.error)
    assert rec.arrays() is None
    np.testing.assert_array_equal(res.table["value"].to_numpy(), pk.probe(pm, x, ["mad"]).table["value"].to_numpy())


RUN = {"name": "explorer",
       "models": [{"model": "toy:vit", "label": "toy-a", "training": "self-supervised"},
                  {"model": "toy:vit", "label": "toy-b", "training": "random init",
                   "options": {"depth": 3, "heads": 4}}],
       "images": {"path": "sample", "count": 5, "seed": 1}, "metrics": ["mad"], "batch_size": 2,
       "figures": [], "report": {"showcase": 2}}


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def test_the_page_holds_every_query_and_one_scale_per_image_and_layer(tmp_path, run_file, monkeypatch):
    import base64
    import zlib

    import probekit.adapter

    forwards = []
    real = probekit.adapter.Adapter.forward
    monkeypatch.setattr(probekit.adapter.Adapter, "forward", lambda self, x: forwards.append(len(x)) or real(self, x))
    cmp = compare(run_file(RUN), out=tmp_path / "out")
    # the probing pass's batches (2, 2, 1 images per model) and nothing else: the explorer ran no pass
    assert forwards == [2, 2, 1] * 2
    rec = json.loads((cmp.run_dir / "run.json").read_text())
    arrays = {m["label"]: explorer.load(cmp.run_dir / m["explorer"]) for m in rec["models"]}
    assert all(a is not None for a in arrays.values()) and all(m["explorer_s"] > 0 for m in rec["models"])
    page = cmp.report.read_text()
    ex = _data(page)["explorer"]
    assert [m["queries"] for m in ex["models"]] == [list(range(16))] * 2 and ex["levels"] == explorer.LEVELS
    assert "16 query patches of the 4x4 grid (all of them)" in ex["stored"]
    blob = zlib.decompress(base64.b64decode(re.search(r'id="blob">([^<]*)<', page).group(1)))
    a, b = arrays["toy-a"], arrays["toy-b"]
    for m, want in zip(ex["models"], (a, b), strict=True):
        for name in ("attn", "cls", "rollout"):
            off, size = m["arrays"][name]
            np.testing.assert_array_equal(np.frombuffer(blob[off:off + size], np.uint8).reshape(want[name].shape),
                                          want[name])
    # the colour scale of an image and layer: the largest code of either model, over every head and query
    for name in ("attn", "cls", "rollout"):
        scale = ex["scale"][name]
        for i in range(2):
            layers = max(a[name].shape[1], b[name].shape[1])
            want = [max(int(x[name][i, la].max()) for x in (a, b) if la < x[name].shape[1]) for la in range(layers)]
            assert scale[i] == want
    # so a model whose peak is lower is drawn dimmer than the other, not stretched to its own maximum
    scale = ex["scale"]["attn"]
    assert any(scale[i][la] > int(x["attn"][i, la].max()) for x in (a, b) for i in range(2)
               for la in range(x["attn"].shape[1]))
