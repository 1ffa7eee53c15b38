"""The front doors: :func:`check_adapter` / :func:`check_metric` return one record per check;
:func:`parametrize_with_checks` makes each check a pytest case."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from probekit.adapter import Adapter, ProbedModel
from probekit.metric import Metric
from probekit.testing.adapters import adapter_checks
from probekit.testing.metrics import metric_checks
from probekit.testing.modes import TRAIN_MODE
from probekit.testing.records import CheckRecord, SkipCheck

__all__ = ["check_adapter", "check_metric", "parametrize_with_checks"]


def _check_name(check: Callable) -> str:
    """``check_x`` or ``check_x(image_size=(24, 40))``: variants keep their arguments in the ID."""
    if isinstance(check, functools.partial):
        kw = {k: v for k, v in check.keywords.items() if v is not None and not callable(v)}
        base = _check_name(check.func)
        return f"{base}({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else base
    return check.__name__


def _label(obj) -> str:
    if isinstance(obj, (ProbedModel, Metric)):
        return obj.label
    return type(obj).__name__


def _as_metric(metric) -> Metric:
    if isinstance(metric, str):
        from probekit.registry import metrics

        return metrics.get(metric)()
    return metric() if isinstance(metric, type) else metric


def _declared(table: dict[str, str], check: Callable) -> str:
    """The entry of ``table`` for ``check`` (its full name with arguments, else its base name)."""
    return table.get(_check_name(check), table.get(_check_name(getattr(check, "func", check)), ""))


def _not_applicable(obj) -> dict[str, str]:
    """An adapter's or a metric's declared ``not_applicable_checks``: ``{check: why it does not apply}``."""
    ad = obj.adapter if isinstance(obj, ProbedModel) else obj
    if isinstance(ad, (Adapter, Metric)):
        return dict(ad.not_applicable_checks or {})
    return {}


def _run_checks(obj, checks: Iterable[Callable], expected_failed_checks, on_fail) -> list[CheckRecord]:
    if on_fail not in ("raise", "warn", None):
        raise ValueError(f"on_fail must be 'raise', 'warn' or None; got {on_fail!r}")
    expected = dict(expected_failed_checks or {})
    not_applicable = _not_applicable(obj)
    name, records = _label(obj), []
    for check in checks:
        cname = _check_name(check)
        reason = _declared(expected, check)
        why_not = _declared(not_applicable, check)
        if why_not:
            records.append(CheckRecord(cname, "skipped", None, f"declared not applicable: {why_not}"))
            continue
        try:
            detail = check(name, obj)
            rec = CheckRecord(cname, "xpass" if reason else "passed", None, reason or (detail or ""))
        except SkipCheck as exc:  # a check that cannot run is a failure unless declared (green never hides a skip)
            msg = (f"could not run: {exc}. If it does not apply, say why in the class's "
                   f"not_applicable_checks = {{{_check_name(getattr(check, 'func', check))!r}: '<reason>'}}.")
            rec = CheckRecord(cname, "xfail" if reason else "failed", exc, reason or msg)
        except Exception as exc:  # a failing check is data here, reported per check
            rec = CheckRecord(cname, "xfail" if reason else "failed", exc, reason or f"{type(exc).__name__}: {exc}")
        records.append(rec)
    failed = [r for r in records if r.status == "failed"]
    if any(r.check == "check_eval_mode" for r in failed):  # the cause of the others: say so where they are read
        for r in failed:
            if r.check != "check_eval_mode":
                r.reason += f" (check_eval_mode failed: {TRAIN_MODE}; fix that first)"
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
    ad = getattr(pm, "adapter", pm)
    with ad.evaluating() if isinstance(ad, Adapter) else contextlib.nullcontext():  # no dropout in any check
        return _run_checks(pm, adapter_checks(pm, reference), expected_failed_checks, on_fail)


def check_metric(metric, expected_failed_checks: dict[str, str] | None = None,
                 on_fail: str | None = "raise") -> list[CheckRecord]:
    """Run every metric check on ``metric`` (an instance, a class or a registered name).

    A metric class declares ``not_applicable_checks = {check name: reason}`` for checks that do
    not apply to it by design (e.g. CKA's minibatch estimator and merged halves), as adapters do;
    those are recorded as skipped with the reason. ``expected_failed_checks`` (the caller's) are xfail.

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
        expected = dict(expected_failed_checks(obj) if expected_failed_checks else {})
        not_applicable = _not_applicable(obj)
        for check in gen:
            cname = _check_name(check)
            bound = functools.partial(_call, check, _label(obj))
            marks = [pytest.mark.xfail(reason=expected[cname])] if cname in expected else []
            if _declared(not_applicable, check):
                marks = [pytest.mark.skip(reason=f"declared not applicable: {_declared(not_applicable, check)}")]
            params.append(pytest.param(obj, bound, id=f"{_label(obj)}-{cname}", marks=marks))
    return pytest.mark.parametrize("obj, check", params)


def _call(check: Callable, name: str, obj) -> None:
    ad = getattr(obj, "adapter", obj)
    try:
        with ad.evaluating() if isinstance(ad, Adapter) else contextlib.nullcontext():  # as check_adapter runs them
            check(name, obj)
    except SkipCheck as exc:  # a check that cannot run fails (declared ones never get here: skip marks)
        raise AssertionError(f"{name}: {_check_name(check)} could not run: {exc}. If it does not apply, say why in "
                             "the class's not_applicable_checks = {check name: reason}.") from exc
