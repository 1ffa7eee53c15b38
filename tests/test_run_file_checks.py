"""What a run file (or the command line) gets wrong is refused before any model loads, with one
line per problem: duplicate YAML keys, model names no library knows, paths with environment
variables (issue 19 items 5, 19, 20)."""

from __future__ import annotations

import os

import pytest

import probekit as pk
from probekit.api import compare
from probekit.runs.config import check_run, load_run
from probekit.errors import ConfigError


def _run_file(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- item 5: duplicate keys ----------------------------------------------------------------------
def test_a_repeated_top_level_key_is_refused_with_both_lines(tmp_path):
    path = _run_file(tmp_path, "models: [toy:vit]\nimages: sample\nmetrics: [mad]\nimages: elsewhere\n")
    with pytest.raises(ConfigError) as info:
        load_run(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "run.yaml line 4" in msg and "`images`" in msg and "line 2" in msg


@pytest.mark.parametrize("text, key, first, second", [
    # a repeated model field inside one list item
    ("models:\n  - model: toy:vit\n    options: {depth: 3}\n    model: toy:other\nmetrics: [mad]\n", "model", 2, 4),
    # a repeated option two levels down (flow style)
    ("models:\n  - model: toy:vit\n    options: {pretrained: false, pretrained: true}\n", "pretrained", 3, 3),
    # a repeated metric in the mapping form
    ("models: [toy:vit]\nmetrics:\n  mad: {units: px}\n  mad: {units: patch}\n", "mad", 3, 4),
])
def test_a_repeated_key_at_any_depth_is_refused(tmp_path, text, key, first, second):
    with pytest.raises(ConfigError) as info:
        load_run(_run_file(tmp_path, text))
    msg = str(info.value)
    assert f"run.yaml line {second}: `{key}` is given twice (first at line {first})" in msg, msg


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """`<<: *base` then an explicit key is how YAML overrides a merged value: not a duplicate."""
    cfg = load_run(_run_file(tmp_path, "models:\n  - model: toy:vit\n    options: &o {depth: 2, heads: 2}\n"
                                       "  - model: toy:vit\n    label: deeper\n    options: {<<: *o, depth: 3}\n"))
    assert cfg.models[1].options == {"depth": 3, "heads": 2}


def test_an_alias_defined_twice_in_an_alias_file_is_refused():
    from probekit.model_aliases import _read_yaml

    text = "vit-x:\n  spec: timm:a\nvit-y:\n  spec: timm:b\nvit-x:\n  spec: timm:c\n"
    with pytest.raises(ConfigError, match=r"models\.yaml line 5: `vit-x` is given twice \(first at line 1\)"):
        _read_yaml(text, "models.yaml")
    assert len(pk.models.aliases()) > 10  # the shipped file has none


# -- item 19: model names checked against each library's list before any model loads ---------------
def test_a_typo_in_a_timm_name_fails_before_any_model_is_built(tmp_path, monkeypatch):
    from probekit.plugins.adapters.timm import TimmAdapter

    built = []
    real = TimmAdapter.from_spec.__func__
    monkeypatch.setattr(TimmAdapter, "from_spec", classmethod(lambda cls, *a, **k: built.append(a) or real(cls, *a, **k)))
    path = _run_file(tmp_path, "models:\n  - model: timm:vit_tiny_patch16_224\n    options: {pretrained: false}\n"
                               "  - model: timm:vit_tiny_patch16_22\n    options: {pretrained: false}\n"
                               "images: {path: sample, count: 2}\nmetrics: [mad]\nfigures: []\n")
    with pytest.raises(ConfigError) as info:
        compare(path, out=tmp_path / "out", report=False)
    msg = str(info.value)
    assert "run.yaml line 4, models[1].model" in msg and "'vit_tiny_patch16_224'" in msg, msg
    assert built == []  # not even the valid model was built
    assert not (tmp_path / "out" / "parts").exists()


@pytest.mark.parametrize("spec, close", [
    ("timm:vit_small_patch16_224.augreg_in2k", "vit_small_patch16_224.augreg_in21k"),  # a bad pretrained tag
    ("open_clip:ViT-B-1/openai", "ViT-B-16"),
    ("open_clip:ViT-B-16/opena", "ViT-B-16/openai"),
    ("hf:facebook/dinov2-smal", "facebook/dinov2-small"),  # offline, not cached, not a folder
])
def test_each_backend_checks_its_names_without_building(tmp_path, spec, close):
    path = _run_file(tmp_path, f"models: ['{spec}']\nimages: {{path: sample, count: 2}}\nmetrics: [mad]\n")
    with pytest.raises(ConfigError) as info:
        check_run(load_run(path))
    assert repr(close) in str(info.value), str(info.value)


def test_the_adapter_contract_has_a_name_check_plugins_can_override():
    assert pk.Adapter.check_spec("anything", pretrained=False) is None  # the default accepts
    from probekit.plugins.adapters.timm import TimmAdapter

    TimmAdapter.check_spec("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(pk.UnknownNameError, match="vit_tiny_patch16_224"):
        TimmAdapter.check_spec("vit_tiny_patch16_22", pretrained=False)


def test_the_cli_refuses_a_typo_before_loading_in_one_line(run_cli, tmp_path):
    r = run_cli("run", "timm:vit_tiny_patch16_22", "--no-pretrained", "--images", "sample", "--count", "2",
                "--out", tmp_path / "out", "--no-figures", "--no-report")
    assert r.exit_code == 1 and "Did you mean: 'vit_tiny_patch16_224'" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "out" / "parts").exists()


# -- item 20: environment variables in paths --------------------------------------------------------
def test_environment_variables_in_run_file_paths_are_expanded(tmp_path, monkeypatch, toy_backend):
    monkeypatch.setenv("PK_TEST_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    path = _run_file(tmp_path, "models:\n  - model: toy:vit\n    options:\n      checkpoint: ${PK_TEST_ROOT}/w.pt\n"
                               "images: [$PK_TEST_ROOT/imgs, sample]\nmetrics: [mad]\nout: $PK_TEST_ROOT/run\n")
    cfg = load_run(path)
    assert cfg.out == f"{tmp_path}/run"
    assert cfg.images.path == [f"{tmp_path}/imgs", "sample"]
    assert cfg.models[0].options["checkpoint"] == f"{tmp_path}/w.pt"
    # and a run writes there, not into a folder named `$PK_TEST_ROOT`
    path.write_text("models: [toy:vit]\nimages: {path: sample, count: 2}\nmetrics: [mad]\nfigures: []\n"
                    "out: $PK_TEST_ROOT/run\n")
    compare(path, report=False)
    assert (tmp_path / "run" / "run.json").is_file() and not (tmp_path / "$PK_TEST_ROOT").exists()


def test_an_undefined_variable_in_a_path_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("PK_TEST_UNSET", raising=False)
    path = _run_file(tmp_path, "models: [toy:vit]\nmetrics: [mad]\nout: $PK_TEST_UNSET/run\n")
    with pytest.raises(ConfigError) as info:
        load_run(path)
    (line,) = [ln for ln in str(info.value).splitlines() if "PK_TEST_UNSET" in ln]
    assert "run.yaml line 3, out" in line and "not set" in line
    assert not (tmp_path / "$PK_TEST_UNSET").exists()


def test_the_cli_expands_variables_in_out_and_images(run_cli, tmp_path, monkeypatch, toy_backend):
    monkeypatch.setenv("PK_TEST_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    r = run_cli("run", "toy:vit", "--images", "sample", "--count", "2", "--out", "$PK_TEST_ROOT/cli-run",
                "--no-figures", "--no-report")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cli-run" / "run.json").is_file() and not (tmp_path / "$PK_TEST_ROOT").exists()
    r = run_cli("run", "toy:vit", "--images", "${PK_TEST_NOPE}/x", "--out", tmp_path / "o2")
    assert r.exit_code == 1 and "PK_TEST_NOPE" in r.stderr and "Traceback" not in r.output
    assert os.listdir(tmp_path).count("$PK_TEST_NOPE") == 0
