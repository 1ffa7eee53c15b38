"""The command line answers without importing torch: `import probekit`, `--help` and the metric
listing stay light (start-up time itself is measured by benchmarks/bench_cli.py, not here)."""

from __future__ import annotations

import json
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
