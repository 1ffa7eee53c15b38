"""The plugin guide's two example packages (examples/), installed as a plugin author would.

They must be installed (README's test command and .ci/run do it): a missing example is a
failure, never a skip, so the guide (docs/plugins.md) cannot rot unnoticed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import probekit as pk
from probekit.cli import app
from probekit.errors import ConfigError
from probekit.testing import check_adapter, check_metric, randomize_parameters

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
INSTALL = "pip install -e examples/probekit-tinyvit -e examples/probekit-gini"


@pytest.fixture(scope="module", autouse=True)
def _installed():
    missing = [m for m in ("probekit_tinyvit", "probekit_gini") if importlib.util.find_spec(m) is None]
    assert not missing, f"example plugins {missing} are not installed; run `{INSTALL}` (README's test command does)"


def test_guide_code_blocks_are_verbatim_parts_of_the_examples():
    # Each block whose first line names a file of the repository quotes that file exactly.
    blocks = re.findall(r"```(?:python|toml)\n# (\S+)\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 10, "the guide quotes the example files"
    for path, body in blocks:
        src = (ROOT / path).read_text()
        assert body in src, f"docs/plugins.md quotes {path}, but that file no longer contains:\n{body}"


def test_entry_points_register_both_plugins():
    assert "tinyvit" in pk.adapters.names() and "gini" in pk.metrics.names()
    assert pk.metrics.get("gini")().name == "gini"


def test_tinyvit_passes_the_adapter_kit_at_full_depth():
    pm = pk.load("tinyvit:tinyvit-s4", pretrained=False)
    randomize_parameters(pm.model, seed=0, scale=0.3)
    records = check_adapter(pm)  # raises on any failure
    assert {r.status for r in records} == {"passed"}, [(r.check, r.status, r.reason) for r in records]
    lay = pm.layout(torch.randn(1, 1, 28, 28))
    assert (lay.num_prefix, lay.grid, lay.patch_size) == (1, (7, 7), (4, 4))


def test_tinyvit_tap_matches_its_explicit_softmax():
    pm = pk.load("tinyvit:tinyvit-s4", pretrained=False)
    randomize_parameters(pm.model, seed=1, scale=0.3)
    x = torch.randn(2, 1, 28, 28)
    got, ref = pm.attention(x), pm.adapter.reference_attention(x)
    assert sorted(got) == sorted(ref) == [0, 1, 2, 3]
    assert max((got[i] - ref[i]).abs().max().item() for i in got) < 1e-5


def test_tinyvit_refuses_missing_weights_and_other_sizes():
    with pytest.raises(pk.WeightsUnavailableError, match="pretrained=False"):
        pk.load("tinyvit:tinyvit-s4")
    with pytest.raises(pk.LayoutError, match="28x28"):
        pk.load("tinyvit:tinyvit-s4", pretrained=False, image_size=32)
    with pytest.raises(pk.UnknownNameError, match="tinyvit-s4"):
        pk.load("tinyvit:tinyvit-s5", pretrained=False)


def test_gini_closed_forms_and_reference():
    from probekit_gini.metric import AttentionGini, gini

    lay = pk.TokenLayout(num_prefix=1, grid=(7, 7), patch_size=(4, 4))
    t = lay.num_tokens
    uniform = torch.full((1, 2, t, t), 1 / t)
    ident = torch.eye(t).expand(1, 2, t, t)
    assert AttentionGini().compute(uniform, lay).abs().max().item() < 1e-6
    assert torch.allclose(AttentionGini().compute(ident, lay), torch.full((1, 2), 48 / 49))
    # against the textbook definition: mean absolute difference over pairs / (2 * mean)
    w = torch.rand(5, 9, dtype=torch.float64)
    textbook = (w[:, :, None] - w[:, None, :]).abs().mean((1, 2)) / (2 * w.mean(1))
    assert torch.allclose(gini(w), textbook)


def test_gini_options_are_declared_and_validated():
    m = pk.metrics.get("gini")(keys="all")
    assert m.label == "gini[keys=all]" and type(m)(**m.options()).label == m.label
    with pytest.raises(ConfigError, match="keys"):
        pk.metrics.get("gini")(keys="some")
    assert {r.status for r in check_metric("gini")} == {"passed"}


def test_probekit_run_with_both_plugins(tmp_path, monkeypatch):
    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "tinyvit:tinyvit-t4", "--no-pretrained", "--images", "sample",
                                 "--metric", "gini", "--metric", "mad", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = pk.Results.read_parquet(out / "results.parquet").table
    # 6 sample images x 2 layers x 2 heads x 2 metrics
    assert len(table) == 6 * 2 * 2 * 2
    g = table[table.metric == "gini"].value
    assert g.between(0, 48 / 49).all() and g.std() > 0
