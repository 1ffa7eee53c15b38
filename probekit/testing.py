"""Conformance checks that an adapter or metric plugin runs on itself (after scikit-learn's).

Each requirement is one module-level ``check_<property>(name, obj, **kw)`` function that opens
with a comment on why it matters, builds tiny seeded inputs, and fails with an
``AssertionError`` naming the plugin. Generators pick the checks that apply from the plugin's
capability constants (``provides_hidden``, ``rowwise``, ...), so no check branches on types.
Two front doors run them:

- :func:`check_adapter` / :func:`check_metric` run every check and return records
  ``(check, status, exception, reason)``; ``on_fail`` sets strictness, and
  ``expected_failed_checks={check name: reason}`` marks known failures as ``xfail``.
- :func:`parametrize_with_checks` makes each check a pytest case (select with ``-k``).

>>> from probekit.testing import check_metric
>>> records = check_metric("mad")
>>> sorted({r.status for r in records})
['passed']
"""

from __future__ import annotations

import copy
import functools
import unittest
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from .adapter import Adapter, CollectSink, ProbedModel
from .attention import LayerAttention
from .metric import Metric
from .probe import MetricSink
from .tokens import TokenLayout

__all__ = [
    "CheckRecord", "SkipCheck", "randomize_parameters",
    "adapter_checks", "metric_checks", "check_adapter", "check_metric", "parametrize_with_checks",
    "check_rows_sum_to_one", "check_layout_matches_tokens", "check_reference_attention",
    "check_batch_independence", "check_tap_keeps_outputs", "check_tap_detaches", "check_wanted_layers",
    "check_hidden_states",
    "check_merged_halves", "check_reset_restores_defaults", "check_batch_size_invariance",
    "check_batch_order_invariance", "check_result_before_update_warns", "check_state_dict_round_trip",
    "check_finite_on_random_attention", "check_blockwise_rows",
]

ATOL = 1e-5  # probabilities: float32 softmax of the same logits agree to ~1e-7


class SkipCheck(unittest.SkipTest):
    """A check that does not apply to this plugin (pytest shows it as skipped)."""


@dataclass
class CheckRecord:
    """One check's outcome: ``status`` is passed, failed, skipped, xfail or xpass.

    ``reason``: why it failed, was skipped or is expected to fail; for a pass, what the check
    measured (e.g. the largest deviation from the reference), if it says.
    """

    check: str
    status: str
    exception: BaseException | None = None
    reason: str = ""


def randomize_parameters(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add seeded Gaussian noise ``scale * N(0, 1)`` to every parameter, in place.

    Random init zeroes biases and relative-position tables and sets layer scales to 1e-5, which
    hides bugs (a dropped bias or a misplaced table changes nothing); noise makes them count.

    Args:
        model: the module to perturb (its floating-point parameters and buffers named like tables).
        seed: generator seed; the same seed gives the same noise.
        scale: noise standard deviation.

    Returns:
        ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))
    return model


# -- helpers ----------------------------------------------------------------------------------
def _adapter(pm: ProbedModel | Adapter) -> Adapter:
    return pm.adapter if isinstance(pm, ProbedModel) else pm


def _input(pm, batch: int = 2, image_size=None, seed: int = 0) -> torch.Tensor:
    ad = _adapter(pm)
    h, w = image_size or ad.default_image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g).to(ad.device)


@torch.inference_mode()
def _tapped(ad: Adapter, x: torch.Tensor, layers=None, hidden: bool = False):
    sink = CollectSink(layers, attention=not hidden, hidden=hidden)
    with ad.tap(sink):
        out = ad.forward(x)
    return sink, out


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a model's output (tensors, tuples, lists, dicts, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _non_native_size(ad: Adapter) -> tuple[int, int]:
    """A non-square size, other than the native one, in whole patches."""
    h, w = ad.default_image_size
    ph, pw = ad.layout(_input(ad, 1)).patch_size
    return (max(ph, h - ph), w + 2 * pw)


def _assert_close(name: str, what: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
    assert got.shape == want.shape, f"{name}: {what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    dev = (got.float().cpu() - want.float().cpu()).abs().max().item()
    assert dev <= atol, f"{name}: {what} deviates by {dev:.3g} (allowed {atol:g})"
    return dev


# -- adapter checks ------------------------------------------------------------------------------
def check_rows_sum_to_one(name: str, pm, image_size=None, atol: float = ATOL) -> None:
    # Metrics treat each query row as a distribution: probabilities must be float32, non-negative,
    # sum to 1 over keys, and cover every layer with num_heads heads.
    ad = _adapter(pm)
    x = _input(ad, 2, image_size)
    probs = _tapped(ad, x)[0].probs
    assert sorted(probs) == list(range(ad.num_layers)), f"{name}: tapped layers {sorted(probs)}, expected 0..{ad.num_layers - 1}"
    for layer, p in probs.items():
        assert p.dtype == torch.float32, f"{name}: layer {layer} probabilities are {p.dtype}, not float32"
        assert p.dim() == 4 and p.shape[:2] == (2, ad.num_heads), f"{name}: layer {layer} shape {tuple(p.shape)}"
        assert p.min().item() >= 0, f"{name}: layer {layer} has negative probabilities"
        _assert_close(name, f"layer {layer} row sums", p.sum(-1), torch.ones(p.shape[:-1]), atol)


def check_layout_matches_tokens(name: str, pm, image_size=None) -> None:
    # Distances come from the layout: a wrong prefix count or grid shifts every position.
    ad = _adapter(pm)
    x = _input(ad, 1, image_size)
    lay = ad.layout(x)
    assert isinstance(lay, TokenLayout), f"{name}: layout() returned {type(lay).__name__}, not TokenLayout"
    for layer, p in _tapped(ad, x)[0].probs.items():
        assert p.shape[-1] == p.shape[-2] == lay.num_tokens, (
            f"{name}: layer {layer} has {p.shape[-1]} tokens at {tuple(x.shape[-2:])}, layout says "
            f"{lay.describe()}"
        )


def check_reference_attention(name: str, pm, reference: Callable | None = None, image_size=None,
                              atol: float = ATOL) -> str:
    # The tap recomputes (or reads) probabilities; they must equal the library's own reference
    # attention (eager / need_weights / AttentionExtract), layer by layer and head by head.
    ad = _adapter(pm)
    x = _input(ad, 2, image_size, seed=1)
    ref_fn = reference or ad.reference_attention
    with torch.inference_mode():
        try:
            ref = ref_fn(x)
        except NotImplementedError as exc:
            raise SkipCheck(f"{name}: no reference attention ({exc})") from exc
    got = _tapped(ad, x)[0].probs
    assert sorted(ref) == sorted(got), f"{name}: reference layers {sorted(ref)} != tapped {sorted(got)}"
    dev = max(_assert_close(name, f"layer {i} attention vs reference", got[i], ref[i], atol) for i in ref)
    # near-uniform rows (random init) agree whatever the bug: report how peaked they were
    top = min(p.amax(-1).mean().item() * p.shape[-1] for p in got.values())
    return f"max |tap - reference| = {dev:.2e}; mean top probability {top:.1f}x uniform"


def check_batch_independence(name: str, pm, atol: float = ATOL) -> None:
    # Images must not see each other (padding masks, batch-norm, shuffled tokens): image i alone
    # gives the same attention as image i inside a batch.
    ad = _adapter(pm)
    x = _input(ad, 3, seed=2)
    full = _tapped(ad, x)[0].probs
    for i in (0, 2):
        alone = _tapped(ad, x[i : i + 1])[0].probs
        for layer in full:
            _assert_close(name, f"image {i} layer {layer} alone vs in a batch", alone[layer][0], full[layer][i], atol)


def check_tap_keeps_outputs(name: str, pm, atol: float = 1e-5) -> None:
    # The model must keep its own fast path under the tap: outputs with and without it agree.
    ad = _adapter(pm)
    x = _input(ad, 2, seed=3)
    with torch.inference_mode():
        plain = _tensors(ad.forward(x))
    tapped = _tensors(_tapped(ad, x)[1])
    assert plain and len(plain) == len(tapped), f"{name}: forward returned {len(plain)} tensors, {len(tapped)} under the tap"
    for i, (a, b) in enumerate(zip(plain, tapped)):
        scale = max(1.0, a.abs().max().item())
        _assert_close(name, f"output {i} under the tap (relative)", b / scale, a / scale, atol)


def check_tap_detaches(name: str, pm) -> None:
    # A tap that outlives its `with` block leaks hooks: later forwards would still call the sink.
    ad = _adapter(pm)
    sink = CollectSink()
    with torch.inference_mode():
        with ad.tap(sink):
            pass
        ad.forward(_input(ad, 1))
    assert not sink.probs, f"{name}: the sink was called after its tap exited (layers {sorted(sink.probs)})"


def check_wanted_layers(name: str, pm) -> None:
    # The engine asks for a subset of layers (--layers); a tap must report only those.
    ad = _adapter(pm)
    want = {ad.num_layers - 1}
    got = _tapped(ad, _input(ad, 1), layers=want)[0].probs
    assert set(got) == want, f"{name}: asked for layers {sorted(want)}, the tap reported {sorted(got)}"


def check_hidden_states(name: str, pm) -> None:
    # Hidden-state metrics (token norms, CKA) need each block's output tokens [B, T, D].
    ad = _adapter(pm)
    if not ad.provides_hidden:
        raise SkipCheck(f"{name}: provides_hidden is False")
    x = _input(ad, 2)
    hid = _tapped(ad, x, hidden=True)[0].hiddens
    t = ad.layout(x).num_tokens
    assert sorted(hid) == list(range(ad.num_layers)), f"{name}: hidden layers {sorted(hid)}"
    dims = {h.shape[-1] for h in hid.values()}
    for layer, h in hid.items():
        assert h.dim() == 3 and h.shape[:2] == (2, t), f"{name}: layer {layer} hidden shape {tuple(h.shape)}, expected [2, {t}, D]"
        assert torch.isfinite(h).all(), f"{name}: layer {layer} hidden states are not finite"
    assert len(dims) == 1, f"{name}: hidden widths differ across layers: {sorted(dims)}"


def adapter_checks(pm, reference: Callable | None = None) -> Iterator[Callable]:
    """The checks that apply to ``pm``, each a ``partial`` taking the model.

    The non-native size variants run when the adapter's ``variable_image_size`` is True (an
    ONNX graph with a fixed input size, or a wrapped tower with a fixed position table, sets
    it False on the instance); the hidden-state check runs when ``provides_hidden``.
    """
    ad = _adapter(pm)
    yield check_rows_sum_to_one
    yield check_layout_matches_tokens
    yield functools.partial(check_reference_attention, reference=reference)
    if ad.variable_image_size:
        size = _non_native_size(ad)
        yield functools.partial(check_rows_sum_to_one, image_size=size)
        yield functools.partial(check_layout_matches_tokens, image_size=size)
        yield functools.partial(check_reference_attention, reference=reference, image_size=size)
    yield check_batch_independence
    yield check_tap_keeps_outputs
    yield check_tap_detaches
    yield check_wanted_layers
    if ad.provides_hidden:
        yield check_hidden_states


# -- metric checks ------------------------------------------------------------------------------
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
    return {"probs": probs, "hidden": hidden, "layout": layout}


def _take(batch: dict, idx) -> dict:
    idx = torch.as_tensor(idx)
    return {"probs": [p[idx] for p in batch["probs"]], "hidden": [h[idx] for h in batch["hidden"]],
            "layout": batch["layout"]}


def _run(metric: Metric, batch: dict, block_mb: float | None = None) -> dict[int, torch.Tensor]:
    """Feed one batch through the engine's sink, as a forward pass would; per-image values by layer."""
    sink = MetricSink([metric], block_mb=block_mb)
    sink.start(batch["layout"])
    for layer in range(_LAYERS):
        if sink.wants_attention:
            sink.attention(layer, LayerAttention(probs_given=batch["probs"][layer]))
        if sink.wants_hidden:
            sink.hidden(layer, batch["hidden"][layer])
    return sink.finish()[metric.label]


def _same(name: str, what: str, a: dict, b: dict, atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b), f"{name}: {what}: layers {sorted(a)} != {sorted(b)}"
    for layer in a:
        assert a[layer].shape == b[layer].shape, f"{name}: {what}: layer {layer} shapes {tuple(a[layer].shape)} != {tuple(b[layer].shape)}"
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
    assert s.keys() == f.keys(), f"{name}: state keys after reset {sorted(s)} != fresh {sorted(f)}"
    for k in s:
        if isinstance(s[k], dict) and k != "options":
            assert not s[k] and not f[k], f"{name}: state {k!r} not empty after reset"
    assert used.options() == fresh.options(), f"{name}: reset changed options"


def check_batch_size_invariance(name: str, metric: Metric) -> None:
    # Values are per image: the batch size used to run must not change any image's value.
    batch = _batch()
    whole = _run(_clone(metric), batch)
    parts = [_run(_clone(metric), _take(batch, [i])) for i in range(6)]
    single = {layer: torch.cat([p[layer] for p in parts]) for layer in whole}
    _same(name, "batch of 6 vs 6 batches of 1", whole, single)


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
    # Saved state (checkpointed runs) must reload to the same result.
    a = _clone(metric)
    _run(a, _batch())
    b = _clone(metric)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    _same(name, "state_dict round trip", b.result(), a.result(), atol=0)


def check_finite_on_random_attention(name: str, metric: Metric) -> None:
    # Random, peaked rows (and rows with exact zeros) must give finite values, not NaN from log(0).
    batch = _batch(seed=5)
    batch["probs"][0] = torch.softmax(40 * torch.randn(batch["probs"][0].shape, generator=torch.Generator().manual_seed(6)), -1)
    for layer, v in _run(_clone(metric), batch).items():
        assert torch.isfinite(v).all(), f"{name}: non-finite values at layer {layer}"


def check_blockwise_rows(name: str, metric: Metric) -> None:
    # The engine feeds row-wise metrics blocks of query rows (long sequences never hold [B,H,T,T]);
    # one row at a time must equal compute() on the whole matrix.
    if not metric.rowwise or metric.needs != "attention":
        raise SkipCheck(f"{name}: not a row-wise attention metric")
    batch = _batch()
    tiny = _run(_clone(metric), batch, block_mb=1e-9)  # one query row per block
    whole = {layer: _clone(metric).compute(batch["probs"][layer], batch["layout"]).float() for layer in tiny}
    _same(name, "row blocks vs compute()", tiny, whole)


def metric_checks(metric: Metric) -> Iterator[Callable]:
    """The checks that apply to ``metric``."""
    yield check_merged_halves
    yield check_reset_restores_defaults
    yield check_batch_size_invariance
    yield check_batch_order_invariance
    yield check_result_before_update_warns
    yield check_state_dict_round_trip
    yield check_finite_on_random_attention
    if metric.rowwise and metric.needs == "attention":
        yield check_blockwise_rows


# -- front doors ----------------------------------------------------------------------------------
def _check_name(check: Callable) -> str:
    """``check_x`` or ``check_x(image_size=(24, 40))``: variants keep their arguments in the ID."""
    if isinstance(check, functools.partial):
        kw = {k: v for k, v in check.keywords.items() if v is not None and not callable(v)}
        base = _check_name(check.func)
        return f"{base}({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else base
    return check.__name__


def _label(obj) -> str:
    if isinstance(obj, ProbedModel):
        return obj.label
    if isinstance(obj, Metric):
        return obj.label
    return type(obj).__name__


def _as_metric(metric) -> Metric:
    if isinstance(metric, str):
        from .registry import metrics

        return metrics.get(metric)()
    return metric() if isinstance(metric, type) else metric


def _run_checks(obj, checks: Iterable[Callable], expected_failed_checks, on_fail) -> list[CheckRecord]:
    if on_fail not in ("raise", "warn", None):
        raise ValueError(f"on_fail must be 'raise', 'warn' or None; got {on_fail!r}")
    expected = dict(expected_failed_checks or {})
    name, records = _label(obj), []
    for check in checks:
        cname = _check_name(check)
        reason = expected.get(cname, expected.get(_check_name(getattr(check, "func", check)), ""))
        try:
            detail = check(name, obj)
            rec = CheckRecord(cname, "xpass" if reason else "passed", None, reason or (detail or ""))
        except SkipCheck as exc:
            rec = CheckRecord(cname, "skipped", exc, str(exc))
        except Exception as exc:  # a failing check is data here, reported per check
            rec = CheckRecord(cname, "xfail" if reason else "failed", exc, reason or f"{type(exc).__name__}: {exc}")
        records.append(rec)
    failed = [r for r in records if r.status == "failed"]
    if failed and on_fail == "warn":
        for r in failed:
            warnings.warn(f"{name}: {r.check} failed: {r.reason}", stacklevel=3)
    if failed and on_fail == "raise":
        lines = "\n".join(f"  {r.check}: {r.reason}" for r in failed)
        raise AssertionError(f"{name} failed {len(failed)} conformance check(s):\n{lines}") from failed[0].exception
    return records


def check_adapter(pm, reference: Callable | None = None, expected_failed_checks: dict[str, str] | None = None,
                  on_fail: str | None = "raise") -> list[CheckRecord]:
    """Run every adapter check on ``pm`` (a :class:`ProbedModel` or an :class:`Adapter`).

    Args:
        pm: the model under test; randomize it first (:func:`randomize_parameters`).
        reference: ``x -> {layer: [B, H, T, T]}``; default ``pm.adapter.reference_attention``.
        expected_failed_checks: ``{check name: reason}``; those failures are recorded as xfail.
        on_fail: ``"raise"`` (an AssertionError listing every failure), ``"warn"`` or None.

    Returns:
        One :class:`CheckRecord` per check.
    """
    return _run_checks(pm, adapter_checks(pm, reference), expected_failed_checks, on_fail)


def check_metric(metric, expected_failed_checks: dict[str, str] | None = None,
                 on_fail: str | None = "raise") -> list[CheckRecord]:
    """Run every metric check on ``metric`` (an instance, a class or a registered name).

    Returns:
        One :class:`CheckRecord` per check (see :func:`check_adapter` for the arguments).
    """
    metric = _as_metric(metric)
    return _run_checks(metric, metric_checks(metric), expected_failed_checks, on_fail)


def parametrize_with_checks(objs: list, expected_failed_checks: Callable[[Any], dict] | None = None):
    """A ``pytest.mark.parametrize`` over every (object, check) pair; the test calls ``check(obj)``.

    >>> from probekit.testing import parametrize_with_checks   # doctest: +SKIP
    >>> @parametrize_with_checks([pk.load("onnx:vit.onnx"), "mad"])  # doctest: +SKIP
    ... def test_conformance(obj, check):
    ...     check(obj)
    """
    import pytest

    params = []
    for obj in objs:
        obj = _as_metric(obj) if isinstance(obj, (str, type)) else obj
        gen = metric_checks(obj) if isinstance(obj, Metric) else adapter_checks(obj)
        expected = expected_failed_checks(obj) if expected_failed_checks else {}
        for check in gen:
            cname = _check_name(check)
            bound = functools.partial(_call, check, _label(obj))
            marks = [pytest.mark.xfail(reason=expected[cname])] if cname in expected else []
            params.append(pytest.param(obj, bound, id=f"{_label(obj)}-{cname}", marks=marks))
    return pytest.mark.parametrize("obj, check", params)


def _call(check: Callable, name: str, obj) -> None:
    check(name, obj)
