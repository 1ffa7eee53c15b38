"""The part key covers every input that changes a value: run settings a metric depends on, and
every file of the plugins involved (not only the module that defines the class).
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import numpy as np
import pytest

import probekit as pk
from probekit.api import compare
from probekit.runs.parts import part_key, plugin_identity


def _cka(res) -> np.ndarray:
    (matrix,) = [v for k, v in res.arrays.items() if "/cka" in k]
    return matrix


# issue 19 item 8: minibatch CKA depends on how images are grouped, but batch_size was not in the key
def test_a_rerun_at_another_batch_size_recomputes_cka_and_reuses_mad(tmp_path, toy_backend, run_file):
    run = run_file(images={"path": "sample", "count": 6},
                   metrics=["mad", {"name": "cka", "options": {"estimator": "minibatch"}}])
    compare(run, out=tmp_path / "out", batch_size=6, report=False)
    with pytest.warns(UserWarning, match="cka skipped a minibatch of 2"):  # batches of 4: the last has 2
        rerun = compare(run, out=tmp_path / "out", batch_size=4, report=False)
    with pytest.warns(UserWarning, match="cka skipped a minibatch of 2"):
        fresh = compare(run, out=tmp_path / "fresh", batch_size=4, report=False)
    six = compare(run, out=tmp_path / "six", batch_size=6, report=False)
    assert not np.allclose(_cka(six.results), _cka(fresh.results))  # the setting matters
    np.testing.assert_array_equal(_cka(rerun.results), _cka(fresh.results))
    (mrec,) = json.loads((tmp_path / "out" / "run.json").read_text())["models"]
    assert mrec["cached"] == ["mad"]  # MAD does not depend on the batch size: its part is reused
    mad = lambda r: r.results.table.sort_values(["image", "layer", "head"])["value"].to_numpy()  # noqa: E731
    np.testing.assert_array_equal(mad(rerun), mad(fresh))


def test_metrics_declare_the_run_settings_they_depend_on():
    cka, mad = pk.metrics.get("cka")(estimator="minibatch"), pk.metrics.get("mad")()
    full = pk.metrics.get("cka")()  # the whole-set estimator: the same matrix at any batch size
    assert cka.depends_on == ("batch_size",) and mad.depends_on == () and full.depends_on == ()
    key = lambda m, bs: part_key("timm:vit_tiny_patch16_224", {}, "fp", m, "torch.float32",  # noqa: E731
                                 settings={"batch_size": bs})
    assert key(cka, 4) != key(cka, 6) and key(mad, 4) == key(mad, 6) and key(full, 4) == key(full, 6)
    with pytest.raises(pk.ConfigError, match="batch_size"):  # a declared setting the caller did not give
        part_key("timm:vit_tiny_patch16_224", {}, "fp", cka, "torch.float32")


# issue 19 item 9: a plugin fixed outside the module that defines its class kept its old key
@pytest.fixture
def helper_plugin(tmp_path, monkeypatch):
    """A plugin package of two modules (the metric, and a helper it imports), registered in-session."""
    pkg = tmp_path / "src" / "pk_twomod"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("SCALE = 1.0\n")
    (pkg / "metric.py").write_text(
        "from probekit.plugins.metrics.prefix import PrefixMass\n"
        "from .helper import SCALE\n\n"
        "class TwoModuleMass(PrefixMass):\n    name = 'two_module_mass'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    importlib.invalidate_caches()
    cls = importlib.import_module("pk_twomod.metric").TwoModuleMass
    pk.register("metric")(cls)
    yield pkg, cls
    pk.metrics.unregister("two_module_mass")
    for mod in ("pk_twomod.metric", "pk_twomod.helper", "pk_twomod"):
        sys.modules.pop(mod, None)


def test_a_change_in_a_plugins_helper_module_or_data_changes_the_part_key(helper_plugin):
    pkg, cls = helper_plugin
    ident = lambda: plugin_identity("metric", "two_module_mass", cls)  # noqa: E731
    key = lambda: part_key("timm:vit_tiny_patch16_224", {}, "fp", cls(), "torch.float32")  # noqa: E731
    before, key_before = ident(), key()
    assert ident() == before  # stable
    (pkg / "helper.py").write_text("SCALE = 2.0\n")  # the fix is in a module the class does not live in
    assert ident() != before and key() != key_before
    changed = ident()
    (pkg / "weights.bin").write_bytes(b"\x00" * 64)  # bundled data counts too
    assert ident() != changed


def test_an_installed_plugin_is_keyed_by_every_file_its_record_lists(tmp_path, monkeypatch):
    """A wheel's files outside the class's package (here a data folder of its own) count too."""
    site = tmp_path / "site"
    (site / "pk_wheel").mkdir(parents=True)
    (site / "pk_wheel_data").mkdir()
    (site / "pk_wheel" / "__init__.py").write_text("")
    (site / "pk_wheel" / "metric.py").write_text(
        "from probekit.plugins.metrics.prefix import PrefixMass\n\nclass WheelMass(PrefixMass):\n    name = 'wheel_mass'\n")
    (site / "pk_wheel_data" / "table.json").write_text('{"scale": 1}')
    info = site / "pk_wheel-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pk-wheel\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[probekit.metrics]\nwheel_mass = pk_wheel.metric:WheelMass\n")
    (info / "RECORD").write_text("pk_wheel/__init__.py,,\npk_wheel/metric.py,,\npk_wheel_data/table.json,,\n"
                                 "pk_wheel-1.0.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    pk.metrics.refresh()
    try:
        metric = pk.metrics.get("wheel_mass")()
        key = lambda: part_key("timm:vit_tiny_patch16_224", {}, "fp", metric, "torch.float32")  # noqa: E731
        before = key()
        (site / "pk_wheel_data" / "table.json").write_text('{"scale": 2}')  # reinstalled, same version
        assert key() != before
    finally:
        monkeypatch.undo()
        importlib.invalidate_caches()
        pk.metrics.refresh()
        for mod in ("pk_wheel.metric", "pk_wheel"):
            sys.modules.pop(mod, None)


def test_the_built_in_plugins_are_keyed_by_the_files_of_probekit():
    """A built-in plugin's key follows every file of its package tree, e.g. a private helper module."""
    import probekit.plugins.adapters._timm_geometry as helper
    from probekit.runs.plugin_files import plugin_files

    pk.adapters.get("timm")  # loaded: its identity has files
    ident = plugin_identity("adapter", "timm")
    assert ident["files"] is not None and ident["files"] == plugin_identity("adapter", "timm")["files"]
    files = plugin_files(pk.adapters.get("timm"))
    assert helper.__file__ in set(files.values())  # the helper, not only timm.py
    assert any(name.startswith("probekit/") for name in files)  # and probekit's own modules


def test_keying_a_plugin_by_its_files_is_cheap_once_memoised():
    from probekit.runs.plugin_files import files_digest, plugin_files

    files_digest(plugin_files(pk.adapters.get("timm")))  # first: every file hashed once
    t0 = time.perf_counter()
    for _ in range(20):
        plugin_identity("adapter", "timm")
    assert (time.perf_counter() - t0) / 20 < 0.05  # memoised: stat calls, no reading
