"""Every backend is listed, plugins' aliases carry training kind and family, and a plugin's
missing dependency is one line naming what to install (issue 9 item 7)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import probekit as pk
from probekit import model_aliases as pk_aliases
from probekit import models as pk_models
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
                              "family": "tiny-vit", "patch": 4, "weights": "unknown", "source": "probekit-mine 0.3"}
    human = cli("models").stdout
    assert "backends" in human and "tiny lucidrains-style ViTs" in human


def test_listing_imports_no_model_library():
    code = ("import sys; from typer.testing import CliRunner; from probekit.cli import app; "
            "r = CliRunner().invoke(app, ['models']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('timm', 'transformers', 'open_clip', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_plugin_aliases_carry_training_kind_and_family(plugin):
    spec, _, meta = pk_models.resolve("my-vit")
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


# -- which aliases have weights on this machine (issue 22, item 16) -----------------------------------
WEIGHTS_YAML = """
backends:
  onnx: "onnx:<path>"
url-vit:
  spec: mine:url
  weights: https://example.org/releases/url_vit_1234.pth
graph-here:
  spec: onnx:pkg:demo_graphs/graph.onnx
graph-gone:
  spec: onnx:pkg:demo_graphs/nothere.onnx
graph-uninstalled:
  spec: onnx:pkg:demo_absent_pkg_xyz/graph.onnx
control:
  spec: timm:vit_small_patch16_224
  options: {pretrained: false}
own-checkpoint:
  spec: timm:vit_small_patch16_224
  options: {checkpoint: $DEMO_CKPT}
"""


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """An empty Hugging Face home and torch home, and a distribution ``probekit-weights`` whose
    aliases name weights every way an alias can (a URL, a file in its package, random init, a checkpoint)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DEMO_CKPT", str(tmp_path / "own.pth"))
    site = tmp_path / "site"
    pkg = site / "demo_weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    graphs = site / "demo_graphs"  # a package that holds a graph: found, never imported
    graphs.mkdir()
    (graphs / "__init__.py").write_text("raise ImportError('demo_graphs is found without importing it')\n")
    (graphs / "graph.onnx").write_bytes(b"onnx")
    (pkg / "aliases.yaml").write_text(textwrap.dedent(WEIGHTS_YAML))
    info = site / "probekit_weights-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probekit-weights\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[probekit.aliases]\nweights = demo_weights:aliases.yaml\n")
    monkeypatch.syspath_prepend(str(site))
    pk_aliases.aliases.cache_clear()
    pk_aliases.backend_descriptions.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    pk_aliases.aliases.cache_clear()
    pk_aliases.backend_descriptions.cache_clear()


def _hub_snapshot(hub: Path, repo: str, files: dict[str, bytes | None]) -> None:
    """A repo in the hub cache as huggingface_hub lays it out: snapshot files are links to blobs
    (None: a link whose blob is missing, as a download cut short leaves it)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("abc123")
    snap = root / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, data in files.items():
        blob = root / "blobs" / f"sha-{name}"
        if data is not None:
            blob.write_bytes(data)
        (snap / name).symlink_to(Path("..", "..", "blobs", blob.name))


def _weights(cli) -> dict[str, str]:
    r = cli("models", "--format", "json")
    assert r.exit_code == 0, r.output
    return {a["alias"]: a["weights"] for a in json.loads(r.stdout)["aliases"]}


def test_models_says_which_aliases_have_weights_here(caches, run_cli):
    got = _weights(run_cli)
    assert got["url-vit"] == "download" and got["dino-s16"] == "download" and got["clip-b16"] == "download"
    assert (got["graph-here"], got["graph-gone"], got["graph-uninstalled"]) == ("bundled", "missing", "not installed")
    assert (got["control"], got["own-checkpoint"]) == ("random init", "missing")
    hub = caches / "hf" / "hub"
    _hub_snapshot(hub, "timm/vit_small_patch16_224.dino", {"config.json": b"{}", "model.safetensors": b"w"})
    _hub_snapshot(hub, "timm/vit_base_patch16_224.dino", {"config.json": b"{}", "model.safetensors": None})
    _hub_snapshot(hub, "timm/vit_base_patch16_clip_224.openai", {"open_clip_pytorch_model.bin": b"w"})
    _hub_snapshot(hub, "google/vit-base-patch16-224", {"config.json": b"{}"})  # no weights file in it
    (caches / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (caches / "torch" / "hub" / "checkpoints" / "url_vit_1234.pth").write_bytes(b"w")
    (caches / "own.pth").write_bytes(b"w")
    got = _weights(run_cli)
    assert got["dino-s16"] == "cached"  # the repo its `weights` names
    assert got["dino-b16"] == "download"  # the snapshot's link points at no blob: a download cut short
    assert got["clip-b16"] == "cached"  # open_clip: the repo in parentheses of its `weights`
    assert got["vit-b16-google"] == "download"  # a config alone loads nothing
    assert got["url-vit"] == "cached" and got["own-checkpoint"] == "local"
    assert got["dino-b16"] == got["deit-s"] == "download"
    r = run_cli("models", "--offline", "--format", "json")
    offline = {a["alias"] for a in json.loads(r.stdout)["aliases"]}
    assert offline == {a for a, w in got.items() if w in ("cached", "bundled", "local", "random init")}
    assert {"dino-s16", "clip-b16", "url-vit", "graph-here", "control", "own-checkpoint"} <= offline
    assert not offline & {"dino-b16", "deit-s", "graph-gone", "graph-uninstalled"}
    human = run_cli("models", "--filter", "dino-*")
    assert "weights" in human.stdout and "cached: in the Hugging Face cache" in " ".join(human.stderr.split())


def test_hub_cache_is_found_as_huggingface_hub_finds_it(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pk_aliases.hf_hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pk_aliases.hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    assert pk_aliases.torch_hub_checkpoints() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert pk_aliases.hf_hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert pk_aliases.hf_hub_cache() == tmp_path / "elsewhere"
    # the library's own answer, in a fresh process with the same environment
    code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == pk_aliases.hf_hub_cache()


def test_listing_weights_imports_no_torch(caches):
    code = ("import sys; from typer.testing import CliRunner; from probekit.cli import app; "
            "r = CliRunner().invoke(app, ['models', '--offline']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'timm', 'transformers', 'open_clip', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
