"""The metric contract plugins rely on: declared, typed options; one name; the kit catches lies."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import pytest
import torch
from pydantic import Field

import probekit as pk
from probekit.runs.parts import part_key
from probekit.errors import ConfigError, PluginLoadError
from probekit.metric.options import alternatives
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
    run = {"batch_size": 16, "seed": 0}  # the run settings a metric may depend on (cka: batch_size)
    base_key = part_key("timm:x", {}, "fp", base, "torch.float32", settings=run)
    for key, value in base.options().items():
        others = alternatives(cls, key, value)
        assert others, f"{name}.{key}: no alternative value"
        for other in others:
            m = cls(**{key: other})
            twin = type(m)(**m.options())
            assert twin.options() == m.options() and twin.label == m.label
            assert m.label != base.label and key in m.label
            assert part_key("timm:x", {}, "fp", m, "torch.float32", settings=run) != base_key


def test_options_are_reported_whatever_attribute_holds_them_and_are_fixed():
    class Gini(pk.Metric):
        name = "gini_test"
        radius: Annotated[int, Field(ge=1)] = 1

        def __init__(self, **options):
            super().__init__(**options)
            self._r = self.radius  # an internal copy: still one declared option

        def row_values(self, block):
            return block.probs.amax(-1) * self._r

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

    def row_values(self, block):
        return block.probs.amax(-1) * self._r


class _NoAlternative(pk.Metric):
    """Broken on purpose: an option the kit cannot vary (no example of another value)."""

    name = "_no_alternative"
    tag: str = "a"

    def row_values(self, block):
        return block.probs.amax(-1)


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

        def row_values(self, block):
            return block.probs.amax(-1)

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


def test_builtin_cka_declares_a_check_not_applicable_and_the_kit_honours_it():
    cka = pk.metrics.get("cka")
    assert cka().not_applicable_checks == {}  # the whole-set estimator passes every check (test_testing_kit)
    assert set(cka(estimator="minibatch").not_applicable_checks) == {"check_merged_halves"}
    with pytest.warns(UserWarning, match="cka skipped a minibatch"):  # the kit's batches are under 4 images
        records = {r.check: r for r in check_metric(cka(estimator="minibatch"))}  # raised before: it declares one
    assert records["check_merged_halves"].status == "skipped"
    assert records["check_merged_halves"].reason.startswith("declared not applicable: minibatch HSIC")
    assert {r.status for r in records.values()} <= {"passed", "skipped"}


def test_literal_options_validate_on_every_builtin():
    for name in BUILTINS:
        cls = pk.metrics.get(name)
        for key, value in cls().options().items():
            if isinstance(value, str):
                with pytest.raises(ConfigError, match=rf"option {key}='nonsense' is invalid.*must be one of"):
                    cls(**{key: "nonsense"})


# -- declared state: generic reset / merge / state_dict; merge checks options on every path -----------

class _Undeclared(pk.Metric):
    """Broken on purpose: a running peak kept in a plain attribute, which merge never sees."""

    name = "_undeclared"

    def row_values(self, block):
        return block.probs.amax(-1)

    def update(self, layer, values):
        super().update(layer, values)
        self._peak = max(getattr(self, "_peak", 0.0), float(values.max()))


class _MergesAnything(pk.Metric):
    """Broken on purpose: a hand-written merge that skips the name and options check."""

    name = "_merges_anything"
    scale: float = 1.0

    def row_values(self, block):
        return block.probs.amax(-1) * self.scale

    def merge(self, other):
        state = other.state_dict() if isinstance(other, pk.Metric) else other
        for layer, v in state["state"]["values"].items():
            self.values.setdefault(layer, []).extend(v)
        return self


def test_kit_fails_undeclared_state():
    fails = _failures(_Undeclared())
    assert fails["check_state_declared"] == (
        "AssertionError: _undeclared: attribute(s) '_peak' changed by a batch but are not declared state, so "
        "merge, reset and state_dict never see them (merged or resumed runs lose them); declare each with "
        "self.add_state('_peak', default, reduce=...) (reduce: one of sum, cat, max, min, same), or empty it "
        "at the batch's end if it is per-batch scratch"
    )


def test_kit_fails_a_merge_that_ignores_options():
    fails = _failures(_MergesAnything())
    assert fails["check_merge_refuses_other_options"] == (
        "AssertionError: _merges_anything: merge() accepted the state of another metric; it must raise ConfigError"
    )


def test_add_state_takes_a_reduction_from_a_closed_set():
    class Bad(pk.Metric):
        name = "bad_state"

        def __init__(self, **options):
            super().__init__(**options)
            self.add_state("total", default=torch.zeros(()), reduce="mean")

    with pytest.raises(ConfigError, match=r"add_state\('total', \.\.\.\) got reduce='mean'; use one of "
                       r"'sum', 'cat', 'max', 'min', 'same'"):
        Bad()


def _fed(metric, seed=0, n=3):
    lay = pk.TokenLayout(num_prefix=1, grid=(2, 3), patch_size=(8, 8))
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, 2, 7, 7, generator=g), -1)
    metric.update(0, metric.compute(probs, lay))
    return metric


def test_merge_refuses_other_options_through_every_path():
    mad, patch = _fed(pk.metrics.get("mad")()), _fed(pk.metrics.get("mad")(units="patch"))
    msg = r"Cannot merge the state of mad\[units=patch\] into mad: different metric or options"
    with pytest.raises(ConfigError, match=msg):
        mad.merge(patch)
    with pytest.raises(ConfigError, match=msg):
        mad.merge(patch.state_dict())  # the state_dict path used to skip the check
    with pytest.raises(ConfigError, match=msg):  # restoring a saved state is a merge into a fresh instance
        type(mad)(**mad.options()).merge(patch.state_dict())
    with pytest.raises(ConfigError, match=r"Cannot merge the state of entropy\[normalized=False\] into mad"):
        mad.merge(_fed(pk.metrics.get("entropy")()).state_dict())
    with pytest.raises(ConfigError, match="not a metric state_dict"):
        mad.merge({"sums": {}, "counts": {}})
    state = patch.state_dict()
    assert state["name"] == "mad" and state["options"]["units"] == "patch"
    # the same options after a JSON round trip (tuples become lists) still merge
    prof = _fed(pk.metrics.get("distance_profile")(bins=[0, 8, 16]))
    state = prof.state_dict()
    state["options"] = {**state["options"], "bins": [0, 8, 16]}
    assert pk.metrics.get("distance_profile")(bins=[0, 8, 16]).merge(state).per_image()[0].shape == (3, 2, 3)


def test_state_is_generic_reset_merge_and_round_trip():
    a, b = _fed(pk.metrics.get("entropy")(), seed=1), _fed(pk.metrics.get("entropy")(), seed=2, n=2)
    whole = pk.metrics.get("entropy")().merge(a).merge(b.state_dict())
    torch.testing.assert_close(whole.per_image()[0], torch.cat([a.per_image()[0], b.per_image()[0]]))
    torch.testing.assert_close(whole.result()[0], whole.per_image()[0].double().mean(0).float())
    again = pk.metrics.get("entropy")().merge(whole.state_dict())  # a restore: merged into a fresh instance
    torch.testing.assert_close(again.per_image()[0], whole.per_image()[0])
    whole.reset()
    assert whole.values == {} and whole.state_dict()["state"] == {"values": {}}
    # 0.1's load_state_dict is gone: a metric that still defines one is told what to write
    with pytest.raises(TypeError, match=r"load_state_dict is probekit 0\.1's metric contract: merge the state_dict "
                       r"into a fresh instance: type\(m\)\(\*\*m\.options\(\)\)\.merge\(state\)"):
        class Restores(pk.Metric):  # noqa: F841
            name = "restores"

            def load_state_dict(self, state):
                self.merge(state)


@pytest.mark.usefixtures("toy_backend")
def test_engine_reads_metric_state_and_shards_merge_to_one_run():
    torch.manual_seed(0)
    pm = pk.load("toy:vit", pretrained=False, image_size=24, patch_size=8, dim=32, depth=2, heads=2, prefix=1)
    x = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    names = ["mad", "entropy", "cls_map", "cka"]
    whole = [pk.metrics.get(n)() for n in names]
    res = pk.probe(pm, x, metrics=whole, batch_size=4)
    halves = []
    for s in (slice(0, 4), slice(4, 8)):
        ms = [pk.metrics.get(n)() for n in names]
        pk.probe(pm, x[s], metrics=ms, batch_size=4)
        halves.append(ms)
    for i, name in enumerate(names):
        merged = pk.metrics.get(name)().merge(halves[0][i]).merge(halves[1][i].state_dict())
        if name == "cka":
            np.testing.assert_allclose(merged.dataset_result(), res.arrays[f"{pm.label}/cka"], rtol=1e-6)
            continue
        for layer, v in merged.per_image().items():
            torch.testing.assert_close(v, whole[i].per_image()[layer])
    # the table is the metric's state, row for row
    mad = res.table[res.table.metric == "mad"].sort_values(["image", "layer", "head"], kind="stable")
    state = whole[0].per_image()
    assert mad.value.tolist() == pytest.approx([float(state[la][im, h]) for im in range(8) for la in sorted(state)
                                                for h in range(2)], rel=0, abs=0)
