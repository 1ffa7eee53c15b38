"""The public entry points: names resolve or fail with close names and the fixing command."""

import pytest

import probekit as pk
from probekit import model_aliases
from probekit.errors import ConfigError, UnknownNameError, WeightsUnavailableError
from probekit.engine.probe import build_metrics


def test_public_names():
    for name in ["load", "wrap", "probe", "compare", "TokenLayout", "Results", "adapters", "metrics"]:
        assert hasattr(pk, name), name
    assert {"hf", "timm", "open_clip", "onnx"} <= set(pk.adapters.names())
    assert {"mad", "entropy", "nmi", "cka"} <= set(pk.metrics.names())


def test_unknown_alias_lists_close_names_and_spec_forms():
    with pytest.raises(UnknownNameError) as err:
        pk.load("dino-s61")
    msg = str(err.value)
    assert "'dino-s16'" in msg and "timm:<model name>" in msg


def test_unknown_backend_lists_backends():
    with pytest.raises(UnknownNameError, match=r"Unknown backend 'tim'.*'timm'"):
        pk.load("tim:vit_small_patch16_224")


def test_alias_install_hint_is_added_to_missing_weights(monkeypatch):
    table = {"ghost": {"spec": "onnx:pkg:probekit_no_such_pkg/m.onnx", "install": "pip install ghost-weights",
                       "alias": "ghost"}}
    monkeypatch.setattr(model_aliases, "aliases", lambda: table)  # what resolve reads
    with pytest.raises(WeightsUnavailableError, match=r"not installed.*For the alias 'ghost': `pip install ghost-weights`"):
        pk.load("ghost")


def test_metric_specs_and_bad_options():
    labels = [m.label for m in build_metrics(["mad", {"mad": {"units": "patch"}}, ("entropy", {"normalized": True})])]
    assert labels == ["mad", "mad[units=patch]", "entropy[normalized=True]"]
    with pytest.raises(ConfigError, match=r"Metric 'mad' has no option 'foo'\. Its options: renormalize: bool.* = False"):
        build_metrics([("mad", {"foo": 1})])
    with pytest.raises(ConfigError, match="units='inch' is invalid.*units must be one of 'px', 'patch', 'fraction'"):
        build_metrics([("mad", {"units": "inch"})])
    with pytest.raises(ConfigError, match="asked for twice"):
        build_metrics(["mad", "mad"])
