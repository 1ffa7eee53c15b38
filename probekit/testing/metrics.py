"""Metric conformance checks on seeded random attention: merge, reset, batch size and order
invariance, the empty-result warning, state round trips, finiteness, and every engine path against
the plain-probability path (:mod:`probekit.testing.paths`).

Each ``check_<property>(name, metric)`` clones the metric it is given; :func:`metric_checks`
yields those that apply.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from probekit import registry
from probekit.attention import LayerAttention
from probekit.engine.sink import MetricSink
from probekit.errors import ConfigError
from probekit.metric import Metric
from probekit.metric.options import alternatives, declared_options
from probekit.metric.state import REDUCTIONS
from probekit.testing.paths import check_engine_paths, check_grouped_paths
from probekit.tokens import TokenLayout

__all__ = [
    "metric_checks", "check_name", "check_options_declared", "check_options_round_trip", "check_state_declared",
    "check_merge_refuses_other_options",
    "check_merged_halves", "check_reset_restores_defaults", "check_batch_size_invariance",
    "check_batch_order_invariance", "check_result_before_update_warns", "check_state_dict_round_trip",
    "check_finite_on_random_attention", "check_engine_paths", "check_grouped_paths",
]

_LAYOUT = TokenLayout(num_prefix=1, grid=(3, 4), patch_size=(8, 8))  # non-square on purpose
_LAYERS, _HEADS, _WIDTH = 3, 2, 16


def _clone(metric: Metric) -> Metric:
    return type(metric)(**metric.options())


def _batch(n: int = 6, seed: int = 0, layout: TokenLayout = _LAYOUT) -> dict[str, Any]:
    """Seeded random attention (peaked rows, like trained heads) and hidden states per layer."""
    g = torch.Generator().manual_seed(seed)
    t = layout.num_tokens
    probs = [torch.softmax(3 * torch.randn(n, _HEADS, t, t, generator=g), -1) for _ in range(_LAYERS)]
    hidden = [torch.randn(n, t, _WIDTH, generator=g) for _ in range(_LAYERS)]
    labels = [f"class{i % 2}" for i in range(n)]  # for metrics that need labels (representation probes)
    return {"probs": probs, "hidden": hidden, "layout": layout, "labels": labels}


def _take(batch: dict, idx) -> dict:
    idx = torch.as_tensor(idx)
    return {"probs": [p[idx] for p in batch["probs"]], "hidden": [h[idx] for h in batch["hidden"]],
            "layout": batch["layout"], "labels": [batch["labels"][int(i)] for i in idx.reshape(-1)]}


def _run(metric: Metric, batch: dict, block_mb: float | None = None) -> dict[int, torch.Tensor]:
    """Feed one batch through the engine's sink, as a forward pass would; per-image values by layer."""
    sink = MetricSink([metric], block_mb=block_mb, labels=batch["labels"])
    sink.start(batch["layout"], batch=(range(len(batch["labels"])), None))
    for layer in range(_LAYERS):
        if sink.wants_attention:
            sink.attention(layer, LayerAttention(probs_given=batch["probs"][layer]))
        if sink.wants_hidden:
            sink.hidden(layer, batch["hidden"][layer])
    return sink.finish()[metric.label]


def _same(name: str, what: str, a: dict, b: dict, atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b), f"{name}: {what}: layers {sorted(a)} != {sorted(b)}"
    for layer in a:
        assert a[layer].shape == b[layer].shape, (
            f"{name}: {what}: layer {layer} shapes {tuple(a[layer].shape)} != {tuple(b[layer].shape)}")
        dev = (a[layer].double() - b[layer].double()).abs().max().item()
        assert dev <= atol, f"{name}: {what}: layer {layer} differs by {dev:.3g}"


def check_merged_halves(name: str, metric: Metric) -> None:
    # Partial runs (processes, machines, resumed runs) combine by merge: two halves merged
    # must equal one pass over the whole batch.
    batch = _batch()
    one, a, b = _clone(metric), _clone(metric), _clone(metric)
    _run(one, batch)
    _run(a, _take(batch, range(0, 2)))
    _run(b, _take(batch, range(2, 6)))
    _same(name, "merged halves vs one pass", a.merge(b).result(), one.result())


def check_reset_restores_defaults(name: str, metric: Metric) -> None:
    # A metric instance is reused across models by the engine; reset must forget everything.
    used, fresh = _clone(metric), _clone(metric)
    _run(used, _batch())
    used.reset()
    s, f = used.state_dict(), fresh.state_dict()
    assert s["state"].keys() == f["state"].keys(), (
        f"{name}: state keys after reset {sorted(s['state'])} != fresh {sorted(f['state'])}")
    for k in s["state"]:
        assert _equal_values(s["state"][k], f["state"][k]), f"{name}: state {k!r} not back to its default after reset"
    assert used.options() == fresh.options(), f"{name}: reset changed options"


def check_batch_size_invariance(name: str, metric: Metric) -> None:
    # Values are per image: the batch size used to run must not change any image's value.
    batch = _batch()
    whole = _run(_clone(metric), batch)
    parts = [_run(_clone(metric), _take(batch, [i])) for i in range(6)]
    single = {layer: torch.cat([p[layer] for p in parts]) for layer in whole}
    _same(name, "batch of 6 vs 6 batches of 1", whole, single)
    if metric.whole_set:  # values made once every image is in (probes): one instance fed both ways
        one, many = _clone(metric), _clone(metric)
        _run(one, batch)
        for i in range(6):
            _run(many, _take(batch, [i]))
        _same(name, "whole-set values, batch of 6 vs 6 batches of 1", many.per_image(), one.per_image())
        assert _equal_values(many.dataset_result(), one.dataset_result()), (
            f"{name}: dataset_result() changes with the batch size")


def check_batch_order_invariance(name: str, metric: Metric) -> None:
    # Shuffled loaders or sharded runs reorder images; each image's value must follow it.
    batch = _batch()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    whole = _run(_clone(metric), batch)
    shuffled = _run(_clone(metric), _take(batch, perm))
    _same(name, "permuted batch", {k: v[perm] for k, v in whole.items()}, shuffled)


def check_result_before_update_warns(name: str, metric: Metric) -> None:
    # An empty result is almost always a wiring bug (wrong layers, wrong needs); say so.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _clone(metric).result()
    assert caught, f"{name}: result() before any update did not warn"


def check_state_dict_round_trip(name: str, metric: Metric) -> None:
    # Saved state (checkpointed runs, shards) must reload to the same values and say whose it is.
    a = _clone(metric)
    _run(a, _batch())
    state = a.state_dict()
    assert state.get("name") == metric.name and state.get("options") == metric.options(), (
        f"{name}: state_dict() must carry the metric's name and options; got name={state.get('name')!r}, "
        f"options={state.get('options')!r}"
    )
    b = _clone(metric).merge(copy.deepcopy(state))  # restoring a state: a merge into a fresh instance
    _same(name, "state_dict round trip", b.result(), a.result(), atol=0)
    _same(name, "state_dict round trip (per image)", b.per_image(), a.per_image(), atol=0)
    assert _equal_values(b.dataset_result(), a.dataset_result()), (
        f"{name}: state_dict round trip changes dataset_result()")


def check_merge_refuses_other_options(name: str, metric: Metric) -> None:
    # mad[units=patch] merged into mad would average patches with pixels: every merge path (an
    # instance or a state_dict) must refuse another metric's or other options' state.
    batch = _batch()
    mine = _clone(metric)
    _run(mine, batch)
    state = mine.state_dict()
    foreign: list[tuple[str, Any]] = [("another metric", {**copy.deepcopy(state), "name": f"{metric.name}_other"})]
    for key, value in metric.options().items():
        for other in alternatives(type(metric), key, value)[:1]:
            theirs = type(metric)(**{**metric.options(), key: other})
            _run(theirs, batch)
            foreign += [(theirs.label, theirs), (f"{theirs.label} (state_dict)", theirs.state_dict())]
    for what, other in foreign:
        try:
            _clone(metric).merge(copy.deepcopy(other) if isinstance(other, dict) else other)
        except ConfigError:
            continue
        raise AssertionError(f"{name}: merge() accepted the state of {what}; it must raise ConfigError")


def check_state_declared(name: str, metric: Metric) -> None:
    # Sharded and resumed runs combine metrics through their declared state (merge, state_dict):
    # anything else a metric keeps from one batch to the next is silently lost when runs combine.
    used, fresh = _clone(metric), _clone(metric)
    _run(used, _batch())
    declared = set(used.state_dict()["state"])
    changed = sorted(
        k for k, v in vars(used).items()
        if k not in declared and (k not in vars(fresh) or not _equal_values(v, vars(fresh)[k]))
    )
    assert not changed, (
        f"{name}: attribute(s) {', '.join(map(repr, changed))} changed by a batch but are not declared state, so "
        "merge, reset and state_dict never see them (merged or resumed runs lose them); declare each with "
        f"self.add_state({changed[0]!r}, default, reduce=...) (reduce: one of {', '.join(REDUCTIONS)}), or "
        "empty it at the batch's end if it is per-batch scratch"
    )


def _equal_values(a: Any, b: Any) -> bool:
    """Deep equality of state values: tensors by value, containers element by element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal_values(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: treat as changed
        return False


def check_finite_on_random_attention(name: str, metric: Metric) -> None:
    # Random, peaked rows (and rows with exact zeros) must give finite values, not NaN from log(0).
    batch = _batch(seed=5)
    batch["probs"][0] = torch.softmax(
        40 * torch.randn(batch["probs"][0].shape, generator=torch.Generator().manual_seed(6)), -1)
    for layer, v in _run(_clone(metric), batch).items():
        assert torch.isfinite(v).all(), f"{name}: non-finite values at layer {layer}"


def check_options_declared(name: str, metric: Metric) -> None:
    # An option the framework cannot see is one the label and the part cache key cannot see:
    # a metric storing `radius` as self._r reports {} and radius 1 and 5 share cached parts.
    sig = inspect.signature(type(metric).__init__)
    params = [p.name for p in sig.parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    cls: type = type(metric)  # not type[Metric], which mypy does not count as Hashable (python/mypy#11470)
    hidden = [p for p in params if p not in declared_options(cls)]
    assert not hidden, (
        f"{name}: constructor parameter(s) {', '.join(map(repr, hidden))} are not declared options, so "
        "options(), the label and the cache key never see them; declare each as a typed class attribute "
        f"({hidden[0]}: int = 1) and drop the __init__ parameter"
    )


def check_options_round_trip(name: str, metric: Metric) -> None:
    # type(m)(**m.options()) is how runs rebuild metrics (cache parts, resumed and sharded runs):
    # it must give the same metric, and every option must change the label (and so the cache key).
    twin = _clone(metric)
    assert twin.options() == metric.options(), (
        f"{name}: options() {twin.options()} after a round trip, not {metric.options()}")
    assert twin.label == metric.label, f"{name}: label {twin.label!r} after a round trip, not {metric.label!r}"
    batch = _batch()
    for key, value in metric.options().items():
        others = alternatives(type(metric), key, value)
        assert others, (
            f"{name}: no other valid value of option {key!r} to check that it changes the label; "
            f"declare one with Field(examples=[...])"
        )
        changed = type(metric)(**{**metric.options(), key: others[0]})
        assert changed.options()[key] == others[0], (
            f"{name}: option {key}={others[0]!r} reads back as {changed.options()[key]!r}"
        )
        assert changed.label != metric.label, f"{name}: option {key}={others[0]!r} leaves the label {metric.label!r}"
        _same(name, f"{key}={others[0]!r} rebuilt from options()", _run(_clone(changed), batch), _run(changed, batch),
              atol=0)


def check_name(name: str, metric: Metric) -> None:
    # Rows, labels and cache keys carry the class's name: an entry point under another name
    # would silently label rows with a name nobody asked for.
    cls = type(metric)
    assert isinstance(cls.name, str) and cls.name, f"{cls.__qualname__}: set a class attribute name = '...'"
    target = f"{cls.__module__}:{cls.__qualname__}"
    for rec in registry.metrics.records():
        ep = rec.entry_point
        if rec.obj is cls or (ep is not None and ep.value == target):
            assert rec.name == cls.name, (
                f"{cls.name}: registered as {rec.name!r} ({rec.dist}) but its class says name = {cls.name!r}; "
                "one name: make the entry point name and the class's name the same"
            )


def metric_checks(metric: Metric) -> Iterator[Callable]:
    """The checks that apply to ``metric``."""
    yield check_name
    yield check_options_declared
    yield check_options_round_trip
    yield check_state_declared
    yield check_merge_refuses_other_options
    yield check_merged_halves
    yield check_reset_restores_defaults
    yield check_batch_size_invariance
    yield check_batch_order_invariance
    yield check_result_before_update_warns
    yield check_state_dict_round_trip
    yield check_finite_on_random_attention
    if metric.reduces == "rows" and metric.needs == "attention":
        yield check_engine_paths
        yield check_grouped_paths
