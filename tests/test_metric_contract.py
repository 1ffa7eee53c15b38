"""The metric contract plugins rely on: declared, typed options; one name; the kit catches lies."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch
from pydantic import Field

import probekit as pk
from probekit.compare import part_key
from probekit.errors import ConfigError, PluginLoadError
from probekit.metric_options import alternatives
from probekit.registry import Registry, _validate_metric
from probekit.testing import check_metric

# the metrics probekit ships (third-party plugins, e.g. the examples/ packages, may be installed beside them)
BUILTINS = [r.name for r in pk.metrics.records() if r.dist.startswith("probekit ")]


def _bool_options():
    for name in BUILTINS:
        cls = pk.metrics.get(name)
        for key, value in cls().options().items():
            if isinstance(value, bool):
                yield name, key


@pytest.mark.parametrize("name, key", list(_bool_options()))
@pytest.mark.parametrize("bad", ["false", "maybe", 1, None])
def test_bool_options_refuse_strings_and_numbers(name, key, bad):
    # YAML `renormalize: "false"` used to run with renormalize on (bool("false") is True)
    with pytest.raises(ConfigError, match=rf"Metric '{name}': option {key}={bad!r} is invalid .*{key} must be bool"):
        pk.metrics.get(name)(**{key: bad})


def test_option_errors_name_type_allowed_values_and_the_valid_options():
    with pytest.raises(ConfigError, match=r"option normalized='maybe' is invalid.*normalized must be bool"):
        pk.metrics.get("entropy")(normalized="maybe")
    with pytest.raises(ConfigError, match=r"units must be one of 'px', 'patch', 'fraction'"):
        pk.metrics.get("mad")(units="inch")
    with pytest.raises(ConfigError, match=r"threshold=0.5 is invalid \(Input should be greater than 1\)"):
        pk.metrics.get("token_norms")(threshold=0.5)
    with pytest.raises(ConfigError, match=r"threshold='3' is invalid.*threshold must be float"):
        pk.metrics.get("token_norms")(threshold="3")
    with pytest.raises(ConfigError, match=r"bins must be left edges increasing from 0"):
        pk.metrics.get("distance_profile")(bins=[0, 32, 16])
    with pytest.raises(ConfigError, match=r"Metric 'mad' has no option 'colour'\. Its options: renormalize: bool"):
        pk.metrics.get("mad")(colour="blue")
    with pytest.raises(ConfigError, match=r"Metric 'nmi' has no option 'x'\. Its options: none"):
        pk.metrics.get("nmi")(x=1)


@pytest.mark.parametrize("name", BUILTINS)
def test_every_option_round_trips_and_changes_label_and_part_key(name):
    cls = pk.metrics.get(name)
    base = cls()
    base_key = part_key("timm:x", {}, "fp", base, "torch.float32")
    for key, value in base.options().items():
        others = alternatives(cls, key, value)
        assert others, f"{name}.{key}: no alternative value"
        for other in others:
            m = cls(**{key: other})
            twin = type(m)(**m.options())
            assert twin.options() == m.options() and twin.label == m.label
            assert m.label != base.label and key in m.label
            assert part_key("timm:x", {}, "fp", m, "torch.float32") != base_key


def test_options_are_reported_whatever_attribute_holds_them_and_are_fixed():
    class Gini(pk.Metric):
        name = "gini_test"
        radius: Annotated[int, Field(ge=1)] = 1

        def __init__(self, **options):
            super().__init__(**options)
            self._r = self.radius  # an internal copy: still one declared option

        def row_values(self, probs, layout, rows):
            return probs.amax(-1) * self._r

    m = Gini(radius=5)
    assert m.options() == {"radius": 5} and m.label == "gini_test[radius=5]"
    assert Gini(**m.options())._r == 5
    with pytest.raises(AttributeError, match="'radius' is an option of metric 'gini_test', fixed at construction"):
        m.radius = 2
    assert check_metric(m, on_fail=None)[0].status == "passed"


# -- deliberately broken metrics fail the kit with a message naming the mistake -------------------

class _HiddenOption(pk.Metric):
    """Broken on purpose: the radius is a constructor parameter stored as self._r, not declared."""

    name = "_hidden_option"

    def __init__(self, radius: int = 1):
        self._r = radius
        super().__init__()

    def row_values(self, probs, layout, rows):
        return probs.amax(-1) * self._r


class _NoAlternative(pk.Metric):
    """Broken on purpose: an option the kit cannot vary (no example of another value)."""

    name = "_no_alternative"
    tag: str = "a"

    def row_values(self, probs, layout, rows):
        return probs.amax(-1)


def _failures(metric) -> dict[str, str]:
    return {r.check: r.reason for r in check_metric(metric, on_fail=None) if r.status == "failed"}


def test_kit_fails_a_hidden_option():
    assert _HiddenOption(radius=5).options() == {}
    fails = _failures(_HiddenOption())
    assert set(fails) == {"check_options_declared"}
    assert fails["check_options_declared"] == (
        "AssertionError: _hidden_option: constructor parameter(s) 'radius' are not declared options, so "
        "options(), the label and the cache key never see them; declare each as a typed class attribute "
        "(radius: int = 1) and drop the __init__ parameter"
    )


def test_kit_fails_an_option_it_cannot_vary():
    fails = _failures(_NoAlternative())
    assert "no other valid value of option 'tag'" in fails["check_options_round_trip"]


def test_kit_fails_a_registered_name_mismatch():
    class AttnGini(pk.Metric):
        name = "attn_gini"

        def row_values(self, probs, layout, rows):
            return probs.amax(-1)

    rec = pk.registry.PluginRecord("gini", "gini-plugin 0.1", obj=AttnGini)
    pk.metrics._discover()
    installed = pk.metrics._records.get("gini")  # the examples/ plugin of that name, when installed
    pk.metrics._records["gini"] = rec
    try:
        fails = _failures(AttnGini())
    finally:
        pk.metrics.unregister("gini")
        if installed is not None:
            pk.metrics._records["gini"] = installed
    assert fails["check_name"] == (
        "AssertionError: attn_gini: registered as 'gini' (gini-plugin 0.1) but its class says name = "
        "'attn_gini'; one name: make the entry point name and the class's name the same"
    )


def test_register_refuses_a_second_name():
    reg = Registry("metric", "probekit.none-such-group", _validate_metric)

    class AttnGini(pk.Metric):
        name = "attn_gini"

    with pytest.raises(PluginLoadError, match=r"'gini' .*registered as 'gini' but its class .*AttnGini says name = 'attn_gini'"):
        reg.register(AttnGini, name="gini")
    assert "gini" not in reg.names()


def test_builtin_cka_declares_its_expected_failure_and_the_kit_honours_it():
    records = {r.check: r for r in check_metric("cka")}  # raised before: CKA declares one
    assert records["check_merged_halves"].status == "xfail"
    assert "minibatch" in records["check_merged_halves"].reason
    assert {r.status for r in records.values()} <= {"passed", "xfail", "skipped"}


def test_literal_options_validate_on_every_builtin():
    for name in BUILTINS:
        cls = pk.metrics.get(name)
        for key, value in cls().options().items():
            if isinstance(value, str):
                with pytest.raises(ConfigError, match=rf"option {key}='nonsense' is invalid.*must be one of"):
                    cls(**{key: "nonsense"})
