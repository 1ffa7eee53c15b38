"""Plugins are found through real entry points (importlib.metadata), clash and break clearly."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import probekit as pk
from probekit.errors import PluginClashError, PluginLoadError, UnknownNameError
from probekit.registry import Registry, _validate_metric


def _make_dist(root: Path, dist: str, module: str, source: str, entry_points: dict[str, dict[str, str]]):
    """A minimal installed distribution: a module plus a .dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


PLUGIN_SRC = """
    import torch
    import probekit as pk
    from probekit.metric import Metric

    class PeakAttention(Metric):
        '''Largest attention probability per head, averaged over query patches.'''
        name = "demo_peak"
        description = "largest attention probability of each query row"
        def row_values(self, block):
            return block.probs.amax(-1)

    class DemoAdapter(pk.Adapter):
        name = "demo"
        @classmethod
        def from_spec(cls, name, **options):
            raise NotImplementedError
        num_layers = property(lambda self: 0)
        num_heads = property(lambda self: 0)
        def layout(self, x):
            raise NotImplementedError
        def tap(self, sink):
            raise NotImplementedError
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh directory on sys.path, with the global registries re-scanned around the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    pk.metrics.refresh()
    pk.adapters.refresh()
    yield tmp_path
    monkeypatch.undo()
    for mod in [m for m in sys.modules if m.startswith("demo_")]:
        del sys.modules[mod]
    pk.metrics.refresh()
    pk.adapters.refresh()


def test_builtins_register_through_entry_points():
    from importlib.metadata import entry_points

    eps = {ep.name for ep in entry_points(group="probekit.metrics")}
    assert "mad" in eps and "mad" in pk.metrics.names()
    assert {"hf", "timm", "open_clip", "onnx"} <= {ep.name for ep in entry_points(group="probekit.adapters")}
    assert pk.metrics.get("mad").__module__ == "probekit.plugins.metrics.distance"


def test_third_party_distribution_is_found_by_name(site):
    _make_dist(
        site, "probekit-demo", "demo_plugin", PLUGIN_SRC,
        {"probekit.metrics": {"demo_peak": "demo_plugin:PeakAttention"},
         "probekit.adapters": {"demo": "demo_plugin:DemoAdapter"}},
    )
    pk.metrics.refresh()
    pk.adapters.refresh()
    assert "demo_peak" in pk.metrics.names() and "demo" in pk.adapters.names()
    metric = pk.metrics.get("demo_peak")()
    lay = pk.TokenLayout(num_prefix=0, grid=(2, 2), patch_size=(16, 16))
    probs = torch.eye(4).expand(1, 1, 4, 4)
    assert metric.compute(probs, lay).item() == pytest.approx(1.0)
    assert [r.dist for r in pk.metrics.records() if r.name == "demo_peak"] == ["probekit-demo 1.2.3"]


def test_clash_names_both_distributions_and_spares_the_others(site):
    src = PLUGIN_SRC
    _make_dist(site, "probekit-one", "demo_one", src, {"probekit.metrics": {"dup": "demo_one:PeakAttention"}})
    _make_dist(site, "probekit-two", "demo_two", src, {"probekit.metrics": {"dup": "demo_two:PeakAttention"}})
    reg = Registry("metric", "probekit.metrics", _validate_metric)
    with pytest.raises(PluginClashError, match=r"probekit-one 1\.2\.3.*probekit-two 1\.2\.3"):
        reg.get("dup")
    assert reg.get("mad").name == "mad"


def test_broken_plugin_errors_when_requested_naming_its_distribution(site):
    _make_dist(site, "probekit-broken", "demo_broken", "raise ImportError('no module named zzz')\n",
               {"probekit.metrics": {"broken": "demo_broken:Nothing"}})
    _make_dist(site, "probekit-notametric", "demo_wrong", "class Wrong: pass\n",
               {"probekit.metrics": {"wrong": "demo_wrong:Wrong"}})
    reg = Registry("metric", "probekit.metrics", _validate_metric)
    assert {"broken", "wrong", "mad"} <= set(reg.names())  # listing imports nothing
    with pytest.raises(PluginLoadError, match=r"'broken' from probekit-broken 1\.2\.3.*zzz"):
        reg.get("broken")
    with pytest.raises(PluginLoadError, match=r"probekit-notametric.*subclass of probekit.Metric"):
        reg.get("wrong")
    assert reg.get("mad").name == "mad"  # neighbours are unaffected
    errors = reg.load_all()
    assert sorted(e.display_name for e in errors if "1.2.3" in str(e)) == [
        "'broken' from probekit-broken 1.2.3", "'wrong' from probekit-notametric 1.2.3"]
    with pytest.raises(PluginLoadError):
        reg.load_all(strict=True)


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownNameError, match=r"Unknown metric 'mda'.*'mad'"):
        pk.metrics.get("mda")


def test_register_decorator_warns_on_collision_naming_both():
    reg = Registry("metric", "probekit.none-such-group", _validate_metric)

    @reg.register
    class A(pk.Metric):
        name = "same"

    with pytest.warns(UserWarning, match=r"'same' from module .*replaces the one from module"):

        @reg.register
        class B(pk.Metric):
            name = "same"

    assert reg.get("same") is B
    assert reg.names(filter="sa*") == ["same"]


def test_natural_sort():
    reg = Registry("metric", "probekit.none-such-group", _validate_metric)
    for n in ["m_patch16", "m_patch8", "m_patch14"]:
        reg.register(type(n, (pk.Metric,), {"name": n}))
    assert reg.names() == ["m_patch8", "m_patch14", "m_patch16"]


def test_entry_point_name_must_be_the_class_name(site):
    # an entry point `gini` whose class says name = "attn_gini" used to label rows `attn_gini`
    src = """
    from probekit.metric import Metric

    class Gini(Metric):
        name = "attn_gini"
        def row_values(self, block):
            return block.probs.amax(-1)
    """
    _make_dist(site, "probekit-gini", "demo_gini", src, {"probekit.metrics": {"gini": "demo_gini:Gini"}})
    reg = Registry("metric", "probekit.metrics", _validate_metric)
    with pytest.raises(PluginLoadError, match=r"'gini' from probekit-gini 1\.2\.3: it is registered as 'gini' "
                       r"but its class demo_gini\.Gini says name = 'attn_gini'"):
        reg.get("gini")
    assert reg.get("mad").name == "mad"
