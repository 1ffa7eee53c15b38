"""The probekit command: listings, inspect, run, compare, plot, and errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import probekit as pk
from probekit.cli import app
from probekit.runs.rundir import load_run_dir


# the toy backend (tests/_toy.py) is registered for each test of this file only (other files see none)
pytestmark = pytest.mark.usefixtures("toy_backend")


@pytest.fixture
def cli(monkeypatch, toy_backend):
    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    runner = CliRunner()
    return lambda *args, **kw: runner.invoke(app, [str(a) for a in args], **kw)


def test_models_lists_aliases_as_table_and_json(cli):
    r = cli("models")
    assert r.exit_code == 0, r.output
    first = next(iter(pk.aliases().items()))
    assert first[0] in r.stdout and first[1]["spec"] in r.stdout
    r = cli("models", "--format", "json")
    rows = json.loads(r.stdout)["aliases"]
    assert {row["alias"]: row["spec"] for row in rows} == {a: e["spec"] for a, e in pk.aliases().items()}
    assert set(rows[0]) == {"alias", "spec", "training", "family", "patch", "weights", "source"}
    assert cli("models", "--format", "yaml").exit_code != 0


def test_metrics_lists_names_and_descriptions(cli):
    r = cli("metrics", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["mad"]["description"] == pk.metrics.get("mad").description
    assert "mad" in cli("metrics").stdout


def test_inspect_describes_layers_heads_and_layout(cli):
    r = cli("inspect", "toy:vit", "--no-pretrained", "--image-size", "40", "-o", "depth=3", "-o", "patch_size=10",
            "--format", "json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["layers"], info["heads"], info["prefix_tokens"]) == (3, 2, 1)
    assert (info["grid"], info["patch_size"], info["tokens"]) == ([4, 4], [10, 10], 17)
    pm = pk.load("toy:vit", pretrained=False, image_size=40, depth=3, patch_size=10)
    assert info["parameters"] == sum(p.numel() for p in pm.model.parameters())
    human = cli("inspect", "toy:vit")
    assert "layers" in human.stdout and "grid" in human.stdout


def test_run_writes_a_run_directory_and_prints_it(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("run", "toy:vit", "--images", "sample", "--count", "3", "--metric", "mad", "--metric", "mad",
            "--metric-option", "mad.units=patch", "--out", out, "--batch-size", "2", "--no-figures")
    # the same metric twice with different options is fine; with the same options it is refused
    assert r.exit_code != 0 and "asked for twice" in r.stderr
    r = cli("run", "toy:vit", "--images", "sample", "--count", "3", "--metric", "mad",
            "--metric-option", "units=patch", "--out", out, "--batch-size", "2", "--no-figures")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert "mad[units=patch]: mean over heads and images per layer" in r.stdout  # labels are not markup
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["metric"]) == {"mad[units=patch]"} and table["image"].nunique() == 3
    run = json.loads((out / "run.json").read_text())
    assert run["metrics"]["mad[units=patch]"]["options"]["units"] == "patch"
    again = cli("run", "toy:vit", "--images", "sample", "--count", "3", "--metric", "mad",
                "--metric-option", "units=patch", "--out", out, "--no-figures")
    assert again.exit_code == 0 and "Served from cache: toy:vit" in again.stderr


def test_unknown_model_says_close_names_and_exits_1_without_traceback(cli):
    r = cli("run", "vit-b1", "--images", "sample")
    assert r.exit_code == 1
    assert "Unknown model 'vit-b1'" in r.stderr and "Did you mean: 'vit-b16'" in r.stderr
    assert "Traceback" not in r.output and r.stdout == ""
    r = cli("inspect", "toy:vit", "-o", "oops")
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_debug_env_shows_the_exception(cli, monkeypatch):
    monkeypatch.setenv("PROBEKIT_DEBUG", "1")
    r = cli("inspect", "nosuch-model")
    assert r.exit_code == 1 and isinstance(r.exception, pk.UnknownNameError)


def test_compare_bad_run_file_points_at_the_line(cli, run_file):
    p = run_file({"models": [{"model": "toy:vit", "pretrained": False}], "metrics": ["mad"]}, file="bad.yaml")
    r = cli("compare", p)
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert lines[0] == "Error: bad.yaml has 1 problem:"
    assert lines[1].strip() == "- bad.yaml line 3, models[0].pretrained: Extra inputs are not permitted (got False)"
    assert "Traceback" not in r.output


def test_failed_model_exits_1_and_keeps_the_others(cli, tmp_path, run_file):
    p = run_file(models=["toy:vit", "toy:missing"], metrics=None, out=str(tmp_path / "o"))
    r = cli("compare", p)
    assert r.exit_code == 1
    assert "1 model(s) failed" in r.stderr and "toy:missing (load): WeightsUnavailableError" in r.stderr
    assert set(pd.read_parquet(tmp_path / "o" / "results.parquet")["model"]) == {"toy:vit"}


def test_ctrl_c_exits_130_and_says_how_to_resume(cli, tmp_path, monkeypatch):
    import probekit.models

    def interrupted(name, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(probekit.models, "load", interrupted)
    r = cli("run", "toy:vit", "--count", "2", "--out", tmp_path / "o", "--no-figures")
    assert r.exit_code == 130 and "run the same command again to resume" in r.stderr
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "interrupted"


def test_plot_draws_from_the_run_directory(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("run", "toy:vit", "--count", "2", "--out", out, "--no-figures").exit_code == 0
    r = cli("plot", out, "--kind", "depth", "--kind", "overlay")
    assert r.exit_code == 0, r.output
    files = sorted(Path(line).name for line in r.stdout.split())
    assert files == ["depth_mad.png", "depth_mad.svg", "overlay_mad.png", "overlay_mad.svg"]
    assert all((out / "figures" / f).stat().st_size > 0 for f in files)
    # the new figures join the run's manifest: the directory still verifies
    assert sorted(json.loads((out / "run.json").read_text())["manifest"]) == sorted(
        ["contrasts.csv", "report.html", "results.parquet/_probekit.json",
         "results.parquet/model=toy%3Avit/metric=mad/part-00000.parquet", "summary.csv",
         *(f"figures/{f}" for f in files)])
    assert len(load_run_dir(out)) == 2 * 2 * 2  # toy: 2 images x 2 layers x 2 heads
    r = cli("plot", tmp_path / "nowhere")
    assert r.exit_code == 1 and "No run directory at" in r.stderr and not (tmp_path / "nowhere").exists()
    (out / "run.json").unlink()  # results.parquet alone vouches for nothing
    r = cli("plot", out)
    assert r.exit_code == 1 and "has results.parquet but no run.json" in r.stderr


# regression: ``probekit plot --metric`` refused map metrics
def test_plot_command_selects_a_map_metric(tmp_path, toy_backend, monkeypatch):
    pytest.importorskip("seaborn")
    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    run = CliRunner()
    out = tmp_path / "run"
    r = run.invoke(app, ["run", "toy:vit", "--count", "2", "--metric", "mad", "--metric", "cls_map",
                         "--out", str(out), "--no-figures"])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["plot", str(out), "--metric", "cls_map"])
    assert r.exit_code == 0, r.output
    assert sorted(Path(line).name for line in r.stdout.split()) == ["maps_cls_map.png", "maps_cls_map.svg"]


def test_every_command_has_help_with_examples(cli):
    for cmd in ("models", "metrics", "inspect", "run", "compare", "plot"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Examples" in r.stdout, cmd
