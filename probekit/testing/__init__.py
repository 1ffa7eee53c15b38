"""Conformance checks that an adapter or metric plugin runs on itself (after scikit-learn's).

Each requirement is one module-level ``check_<property>(name, obj, **kw)`` function that opens
with a comment on why it matters, builds tiny seeded inputs, and fails with an
``AssertionError`` naming the plugin. Generators pick the checks that apply from the plugin's
capability constants (``provides_hidden``, ``reduces``, ...), so no check branches on types.
Two front doors run them:

- :func:`check_adapter` / :func:`check_metric` run every check and return records
  ``(check, status, exception, reason)``; ``on_fail`` sets strictness, and
  ``expected_failed_checks={check name: reason}`` marks known failures as ``xfail``; a class's
  declared ``not_applicable_checks = {check name: reason}`` (adapters and metrics alike) skips
  those checks with the reason, and any other check that cannot run fails.
- :func:`parametrize_with_checks` makes each check a pytest case (select with ``-k``).

>>> from probekit.testing import check_metric
>>> records = check_metric("mad")
>>> sorted({r.status for r in records})
['passed']
"""

from __future__ import annotations

from probekit.testing.adapters import (
    ATOL,
    adapter_checks,
    check_batch_independence,
    check_eval_mode,
    check_hidden_is_block_output,
    check_hidden_keys,
    check_hidden_states,
    check_layout_matches_tokens,
    check_patch_geometry,
    check_preprocess,
    check_preprocess_matches_library,
    check_reference_attention,
    check_rows_sum_to_one,
    check_stops_early,
    check_tap_detaches,
    check_tap_keeps_outputs,
    check_wanted_layers,
    randomize_parameters,
)
from probekit.testing.metrics import (
    check_batch_order_invariance,
    check_batch_size_invariance,
    check_engine_paths,
    check_finite_on_random_attention,
    check_grouped_paths,
    check_merge_refuses_other_options,
    check_merged_halves,
    check_name,
    check_options_declared,
    check_options_round_trip,
    check_reset_restores_defaults,
    check_result_before_update_warns,
    check_state_declared,
    check_state_dict_round_trip,
    metric_checks,
)
from probekit.testing.records import CheckRecord, SkipCheck
from probekit.testing.runner import check_adapter, check_metric, parametrize_with_checks

__all__ = [
    "ATOL", "CheckRecord", "SkipCheck", "randomize_parameters",
    "adapter_checks", "metric_checks", "check_adapter", "check_metric", "parametrize_with_checks",
    "check_rows_sum_to_one", "check_layout_matches_tokens", "check_reference_attention",
    "check_batch_independence", "check_tap_keeps_outputs", "check_tap_detaches", "check_wanted_layers",
    "check_stops_early",
    "check_hidden_states", "check_patch_geometry", "check_hidden_keys", "check_hidden_is_block_output",
    "check_eval_mode", "check_preprocess", "check_preprocess_matches_library",
    "check_name", "check_options_declared", "check_options_round_trip", "check_state_declared",
    "check_merge_refuses_other_options",
    "check_merged_halves", "check_reset_restores_defaults", "check_batch_size_invariance",
    "check_batch_order_invariance", "check_result_before_update_warns", "check_state_dict_round_trip",
    "check_finite_on_random_attention", "check_engine_paths", "check_grouped_paths",
]
