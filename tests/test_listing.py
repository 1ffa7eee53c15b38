"""Every backend is listed, plugins' aliases carry training kind and family, and a plugin's
missing dependency is one line naming what to install (issue 9 item 7)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import probekit as pk
from probekit import model_aliases as pk_aliases
from probekit.runs.config import CheckedRun
from probekit.errors import MissingDependencyError, PluginLoadError

ALIASES_YAML = """
backends:
  mine: "mine:<size>: tiny lucidrains-style ViTs"
my-vit:
  spec: mine:tiny
  family: tiny-vit
  training: supervised
  patch_size: 4
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed distribution ``probekit-mine``: an adapter whose module needs a library that is
    not installed, and an alias file shipped as package data."""
    pkg = tmp_path / "demo_mine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "adapter.py").write_text("import demo_missing_lib  # not installed\n")
    (pkg / "aliases.yaml").write_text(textwrap.dedent(ALIASES_YAML))
    info = tmp_path / "probekit_mine-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probekit-mine\nVersion: 0.3\n"
                                   "Requires-Dist: demo-missing-lib>=2.0\n")
    (info / "entry_points.txt").write_text("[probekit.adapters]\nmine = demo_mine.adapter:MineAdapter\n\n"
                                           "[probekit.metrics]\nmine_peak = demo_mine.adapter:Peak\n\n"
                                           "[probekit.aliases]\nmine = demo_mine:aliases.yaml\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def rescan():
        pk.adapters.refresh()
        pk.metrics.refresh()
        pk_aliases.aliases.cache_clear()
        pk_aliases.backend_descriptions.cache_clear()

    rescan()
    yield
    monkeypatch.undo()
    for mod in [m for m in sys.modules if m.startswith("demo_mine")]:
        del sys.modules[mod]
    rescan()


@pytest.fixture
def cli(run_cli):
    return run_cli


def test_models_lists_every_backend_with_what_it_loads(plugin, cli):
    r = cli("models", "--format", "json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    backends = {b["backend"]: b for b in out["backends"]}
    assert {"hf", "timm", "open_clip", "onnx", "mine"} <= set(backends)  # today: aliases only
    assert backends["mine"] == {"backend": "mine", "loads": "mine:<size>: tiny lucidrains-style ViTs",
                                "source": "probekit-mine 0.3", "aliases": 1}
    assert backends["timm"]["loads"].startswith("timm:<model name>") and backends["timm"]["source"].startswith("probekit ")
    rows = {a["alias"]: a for a in out["aliases"]}
    assert rows["my-vit"] == {"alias": "my-vit", "spec": "mine:tiny", "training": "supervised",
                              "family": "tiny-vit", "patch": 4, "source": "probekit-mine 0.3"}
    human = cli("models").stdout
    assert "backends" in human and "tiny lucidrains-style ViTs" in human


def test_listing_imports_no_model_library():
    code = ("import sys; from typer.testing import CliRunner; from probekit.cli import app; "
            "r = CliRunner().invoke(app, ['models']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('timm', 'transformers', 'open_clip', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_plugin_aliases_carry_training_kind_and_family(plugin):
    spec, _, meta = pk.models.resolve("my-vit")
    assert spec == "mine:tiny" and (meta["training"], meta["family"]) == ("supervised", "tiny-vit")


def test_missing_plugin_dependency_is_one_line_naming_the_package(plugin, cli, run_file):
    want = ("The adapter plugin 'mine' from probekit-mine 0.3 needs the Python module 'demo_missing_lib', which "
            "is not installed. Install it: pip install demo-missing-lib")
    with pytest.raises(PluginLoadError) as err:
        pk.adapters.get("mine")
    assert str(err.value).startswith(want)
    r = cli("inspect", "my-vit")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert want in r.output.replace("\n", " ")
    assert "Run `probekit models` to see which adapter plugins load." in r.output  # today: `probekit metrics`
    r = cli("models", "--check", "--format", "json")
    status = {b["backend"]: b["status"] for b in json.loads(r.stdout)["backends"]}
    assert status["timm"] == "ok" and status["mine"].startswith(want)
    metric_line = want.replace("adapter plugin 'mine'", "metric plugin 'mine_peak'")
    rows = {m["name"]: m for m in json.loads(cli("metrics", "--format", "json").stdout)}
    assert rows["mine_peak"]["error"].startswith(metric_line)
    run = run_file(models=["timm:vit_small_patch16_224"], metrics=["mine_peak"], images=None, figures=None)
    r = cli("compare", run)
    assert r.exit_code == 1 and metric_line in r.output.replace("\n", " ")


def test_a_backend_missing_its_library_at_build_time_names_it(toy_backend):
    class Needy(toy_backend.ToyAdapter):
        name, library, extra = "needy", "demo_absent_lib", ""

        @classmethod
        def from_spec(cls, name, **options):
            import demo_absent_lib  # noqa: F401

    pk.register("adapter")(Needy)
    try:
        with pytest.raises(MissingDependencyError, match=r"^The needy backend needs the Python module "
                                                         r"'demo_absent_lib', which is not installed\. Install it: "
                                                         r"pip install demo_absent_lib$"):
            pk.load("needy:x")
    finally:
        pk.adapters.unregister("needy")


def test_checked_run_has_no_dead_fields():
    assert "problems" not in CheckedRun.__dataclass_fields__
