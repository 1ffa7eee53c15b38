"""probekit.testing: the conformance kit, run on MAD, on deliberately broken plugins, and on
every registered adapter and metric (the ones whose modules import; tiny random-init models)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import probekit as pk
from probekit.adapter import ProbedModel
from probekit.testing import (
    check_adapter,
    check_metric,
    check_reference_attention,
    check_rows_sum_to_one,
    parametrize_with_checks,
    randomize_parameters,
)
from probekit_tests_helpers import LastHidden, export_onnx, tiny_dinov2  # tests/_helpers.py, via conftest

MAD_CHECKS = {
    "check_name", "check_options_declared", "check_options_round_trip", "check_state_declared",
    "check_merge_refuses_other_options", "check_merged_halves", "check_reset_restores_defaults", "check_batch_size_invariance",
    "check_batch_order_invariance", "check_result_before_update_warns", "check_state_dict_round_trip",
    "check_finite_on_random_attention", "check_engine_paths", "check_grouped_paths",
}


# -- metrics ------------------------------------------------------------------------------------
def test_check_metric_passes_on_mad():
    records = check_metric("mad")
    assert {r.check for r in records} == MAD_CHECKS
    assert {r.status for r in records} == {"passed"}
    assert {r.status for r in check_metric(pk.metrics.get("mad")(renormalize=True, units="patch"))} == {"passed"}


@parametrize_with_checks(["mad", pk.metrics.get("mad")(units="fraction")])
def test_mad_conformance(obj, check):
    check(obj)


class _BatchCoupled(pk.Metric):
    """Broken on purpose: values divided by the batch mean (images see each other)."""

    name = "_coupled"

    def row_values(self, block):
        v = block.patch_rows().amax(-1)
        return v / v.mean(0, keepdim=True)


class _LogZero(pk.Metric):
    """Broken on purpose: sum p log p without guarding p == 0 gives NaN."""

    name = "_logzero"

    def row_values(self, block):
        return (block.probs * block.probs.log()).sum(-1)


class _Sticky(pk.Metric):
    """Broken on purpose: reset forgets nothing after the first update, and result never warns."""

    name = "_sticky"

    def row_values(self, block):
        return block.probs.amax(-1)

    def reset(self):
        if not getattr(self, "values", None):
            super().reset()

    def result(self):
        return {k: v.mean(0) for k, v in self.per_image().items()}


class _RowsIgnored(pk.Metric):
    """Broken on purpose: distances of the first rows whatever block of rows it is given."""

    name = "_rows_ignored"

    def row_values(self, block):
        d = block.layout.grid_distances(block.probs.device)[: block.probs.shape[2]]  # not block.rows' rows
        return (block.patch_rows() * d).sum(-1)


class _MeanOfMeans(pk.Metric):
    """Broken on purpose: every batch weighs the same in the state, whatever its size."""

    name = "_mean_of_means"

    def row_values(self, block):
        return block.probs.amax(-1)

    def update(self, layer, values):
        super().update(layer, values.mean(0, keepdim=True))


class _Sorted(pk.Metric):
    """Broken on purpose: values sorted across the batch (they no longer follow their image)."""

    name = "_sorted"

    def row_values(self, block):
        return block.probs.amax(-1).sort(0).values


class _LossyState(pk.Metric):
    """Broken on purpose: state_dict rounds the values to float16."""

    name = "_lossy"

    def row_values(self, block):
        return block.probs.amax(-1)

    def state_dict(self):
        state = super().state_dict()
        state["state"]["values"] = {k: [v.half().float() for v in vs] for k, vs in state["state"]["values"].items()}
        return state


@pytest.mark.parametrize("metric, broken", [
    (_RowsIgnored, {"check_engine_paths"}),  # blocks of one query row
    (_MeanOfMeans, {"check_merged_halves"}),
    (_Sorted, {"check_batch_order_invariance"}),
    (_LossyState, {"check_state_dict_round_trip"}),
    (_BatchCoupled, {"check_batch_size_invariance"}),
    (_LogZero, {"check_finite_on_random_attention"}),
    (_Sticky, {"check_reset_restores_defaults", "check_result_before_update_warns"}),
])
def test_check_metric_catches_broken_metrics(metric, broken):
    records = {r.check: r for r in check_metric(metric(), on_fail=None)}
    failed = {c for c, r in records.items() if r.status == "failed"}
    assert broken <= failed, failed
    assert all(metric.name in str(records[c].exception) for c in broken)
    if metric is _RowsIgnored:  # the failure names the path: blocks of one query row, not the whole layer
        assert "(one query row per block): differs by" in records["check_engine_paths"].reason
    with pytest.raises(AssertionError, match="conformance check"):
        check_metric(metric())
    reasons = {c: "known" for c in failed}
    xfailed = check_metric(metric(), expected_failed_checks=reasons)  # no raise: declared
    assert {r.status for r in xfailed if r.check in failed} == {"xfail"}
    with pytest.warns(UserWarning) as warned:
        check_metric(metric(), on_fail="warn")
    assert all(any(c in str(w.message) for w in warned) for c in broken)


# -- adapters -----------------------------------------------------------------------------------
def _export_dinov2(path, image_size=28, layers=2):
    """A tiny randomized transformers DINOv2 (eager) as ONNX with a dynamic input size."""
    import onnxruntime  # noqa: F401  (a [test] dependency: missing is a failure)
    m = tiny_dinov2(image_size=image_size, layers=layers, seed=0, scale=0.3)
    return export_onnx(LastHidden(m), torch.randn(1, 3, image_size, image_size), path, dynamic_size=True)


@pytest.fixture(scope="module")
def onnx_pm(tmp_path_factory):
    path = _export_dinov2(tmp_path_factory.mktemp("kit") / "dinov2.onnx")
    return pk.load(f"onnx:{path}", image_size=28)


def test_check_adapter_records_and_variants(onnx_pm):
    records = check_adapter(onnx_pm)
    names = [r.check for r in records]
    assert "check_reference_attention(image_size=(21, 42))" in names  # a variant keeps its arguments
    assert "check_patch_geometry(image_size=(21, 42))" in names  # geometry at a non-square size too
    skipped = {r.check: r.reason for r in records if r.status == "skipped"}
    assert list(skipped) == ["check_hidden_is_block_output"]  # declared by the ONNX adapter, with why
    assert skipped["check_hidden_is_block_output"].startswith("declared not applicable: onnxruntime runs")
    assert {r.status for r in records} == {"passed", "skipped"}


def test_check_adapter_catches_wrong_layout(onnx_pm, monkeypatch):
    monkeypatch.setattr(onnx_pm.adapter, "_num_prefix", 2)  # one prefix token too many
    records = {r.check: r.status for r in check_adapter(onnx_pm, on_fail=None)}
    assert records["check_layout_matches_tokens"] == "failed"
    assert records["check_rows_sum_to_one"] == "passed"


def test_check_adapter_catches_reference_mismatch_and_leaky_tap(onnx_pm, monkeypatch):
    # a reference that moves 2e-5 of mass between two keys of layer 1 must fail the 1e-5 tolerance
    def off(x):
        ref = onnx_pm.adapter.reference_attention(x)
        ref[1] = ref[1].clone()
        ref[1][..., 0] += 2e-5
        ref[1][..., 1] -= 2e-5
        return ref

    records = {r.check: r for r in check_adapter(onnx_pm, reference=off, on_fail=None)}
    assert records["check_reference_attention"].status == "failed"
    assert "layer 1" in records["check_reference_attention"].reason
    from contextlib import contextmanager

    @contextmanager
    def leaky(sink):
        onnx_pm.adapter._sink = sink
        yield

    monkeypatch.setattr(onnx_pm.adapter, "tap", leaky)
    records = {r.check: r.status for r in check_adapter(onnx_pm, on_fail=None)}
    assert records["check_tap_detaches"] == "failed"
    onnx_pm.adapter._sink = None


def test_check_stops_early_catches_state_left_by_a_stopped_forward_and_a_swallowed_stop(onnx_pm, monkeypatch):
    from probekit.engine.sink import ForwardDone

    forward, ad = onnx_pm.adapter.forward, onnx_pm.adapter
    count = {"reported": 0}

    class Numbering:  # numbers layers as they come, a count that only a forward run to its end resets
        def __init__(self, sink):
            self.sink, self.layers = sink, sink.layers
            self.wants_attention, self.wants_hidden = sink.wants_attention, sink.wants_hidden

        def attention(self, layer, attn):
            count["reported"] += 1
            return self.sink.attention(count["reported"] - 1, attn)

        def hidden(self, layer, tokens, layout=None):
            return self.sink.hidden(layer, tokens, layout)

    def numbering(x):
        sink = ad._sink
        if sink is None:
            return forward(x)
        ad._sink = Numbering(sink)
        try:
            out = forward(x)
        finally:
            ad._sink = sink
        count["reported"] = 0
        return out

    monkeypatch.setattr(ad, "forward", numbering)
    records = {r.check: r for r in check_adapter(onnx_pm, on_fail=None)}
    assert records["check_stops_early"].status == "failed"
    assert "are not those of whole ones" in records["check_stops_early"].reason
    monkeypatch.undo()

    def swallowing(x):
        try:
            return forward(x)
        except ForwardDone:
            return None

    monkeypatch.setattr(ad, "forward", swallowing)
    records = {r.check: r for r in check_adapter(onnx_pm, on_fail=None)}
    assert records["check_stops_early"].status == "failed"
    assert "caught the sink's ForwardDone" in records["check_stops_early"].reason


def _broken_run(onnx_pm, monkeypatch, change):
    run = onnx_pm.model.run
    monkeypatch.setattr(onnx_pm.model, "run", lambda x, extra=(): change(run, x, list(extra)))


@pytest.mark.parametrize("check, change", [
    # images see each other
    ("check_batch_independence", lambda run, x, extra: run(x + x.mean(0, keepdim=True), extra)),
    # the tap changes what the model returns
    ("check_tap_keeps_outputs", lambda run, x, extra: [a + 0.01 * bool(extra) for a in run(x, extra)]),
])
def test_check_adapter_catches_broken_runs(onnx_pm, monkeypatch, check, change):
    _broken_run(onnx_pm, monkeypatch, change)
    records = {r.check: r.status for r in check_adapter(onnx_pm, on_fail=None)}
    assert records[check] == "failed"


def test_check_adapter_catches_unwanted_layers_and_bad_hidden(onnx_pm, monkeypatch):
    from probekit.plugins.adapters import onnx as onnx_adapter

    monkeypatch.setattr(onnx_adapter, "wants", lambda sink, layer: True)  # ignores sink.layers
    monkeypatch.setattr(onnx_pm.adapter, "_hidden_names", onnx_pm.adapter._attn_names)  # [B,H,T,T]
    records = {r.check: r.status for r in check_adapter(onnx_pm, on_fail=None)}
    assert records["check_wanted_layers"] == records["check_hidden_states"] == "failed"


def test_rows_check_catches_unnormalized(onnx_pm, monkeypatch):
    run = onnx_pm.model.run
    monkeypatch.setattr(onnx_pm.model, "run", lambda x, extra=(): [a * 1.001 for a in run(x, extra)])
    with pytest.raises(AssertionError, match="row sums"):
        check_rows_sum_to_one("dinov2", onnx_pm)


def test_randomize_parameters_is_seeded_and_moves_zeros():
    def zeroed():
        m = torch.nn.Linear(4, 4)
        for p in m.parameters():
            torch.nn.init.zeros_(p)
        return m

    a = randomize_parameters(zeroed(), seed=3, scale=0.5)
    b = randomize_parameters(zeroed(), seed=3, scale=0.5)
    c = randomize_parameters(zeroed(), seed=4, scale=0.5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)  # seeded
    assert a.bias.abs().min() > 0 and not torch.equal(a.weight, c.weight)  # zeros move
    assert 0.2 < a.weight.std().item() < 0.8  # the scale is the noise's std


# -- every registered plugin ----------------------------------------------------------------------
def _tiny_timm():
    import timm
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=0,
        init_values=1e-5, dynamic_img_size=True)
    return [m]


def _tiny_hf():
    import transformers as tr
    cfg = tr.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    return [tr.ViTModel(cfg, add_pooling_layer=False)]


def _tiny_open_clip():
    import open_clip as oc
    vision = dict(layers=2, width=32, head_width=16, image_size=32, patch_size=8, mlp_ratio=2)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    clip = oc.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return [clip.visual, clip]


def _tiny_tinyvit():
    from probekit_tinyvit import TinyViT  # the plugin guide's example (registered only when installed)

    return [TinyViT(dim=32, depth=2, heads=2, mlp_dim=64)]


BUILDERS = {"timm": _tiny_timm, "hf": _tiny_hf, "open_clip": _tiny_open_clip, "tinyvit": _tiny_tinyvit}


@pytest.mark.parametrize("name", pk.adapters.names())
def test_registered_adapter_conformance(name, tmp_path):
    # every registered adapter must load and pass: a plugin that does not import, or one with no tiny
    # model here, fails (a skip would hide it)
    cls = pk.adapters.get(name)
    if name == "onnx":
        pm = pk.load(f"onnx:{_export_dinov2(tmp_path / 'm.onnx')}", image_size=28)
    else:
        assert name in BUILDERS, f"no tiny random-init builder for adapter {name!r}: add one to BUILDERS"
        candidates = BUILDERS[name]()
        module = next((m for m in candidates if cls.can_wrap(m)), None)
        assert module is not None, f"{cls.__name__}.can_wrap accepts none of {[type(m).__name__ for m in candidates]}"
        randomize_parameters(module.eval(), seed=0, scale=0.3)  # peaked heads
        pm = ProbedModel(cls.from_module(module), spec=f"{name}:<tiny>", label=f"{name}-tiny")
    records = check_adapter(pm, on_fail=None)  # the kit reads the adapter's not_applicable_checks itself
    failed = [f"{r.check}: {r.reason}" for r in records if r.status == "failed"]
    assert not failed, "\n".join(failed)


# what a built-in metric says about the kit's tiny batches (a probekit warning unasserted is an error)
TINY_BATCH_WARNINGS: dict[str, str] = {}  # none now: cka's default (whole-set) estimator takes batches of 1


@pytest.mark.parametrize("name", pk.metrics.names())
def test_registered_metric_conformance(name):
    cls = pk.metrics.get(name)
    said = TINY_BATCH_WARNINGS.get(name)
    with pytest.warns(UserWarning, match=said) if said else contextlib.nullcontext():
        records = check_metric(cls(), on_fail=None)  # the kit reads the class's not_applicable_checks itself
    failed = [f"{r.check}: {r.reason}" for r in records if r.status == "failed"]
    assert not failed, "\n".join(failed)


def test_reference_from_the_same_layer_inputs_at_depth():
    # fused and unfused float32 paths drift apart through 12 layers (3e-5 at layer 2 here, over the
    # 1e-5 tolerance, when the reference is a whole forward of its own): the reference must be computed
    # from the inputs each layer really received, and must still catch a tap 0.1% off
    import timm
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=0)
    randomize_parameters(m.eval(), seed=0, scale=0.3)
    pm = pk.wrap(m)
    detail = check_reference_attention("deep", pm)
    assert "per layer" in detail
    from probekit.plugins.adapters import _sdpa_spy

    report = _sdpa_spy.attention_report

    def off(sink, layer):  # the tap's scale 0.1% too large, in the last layer only
        inner = report(sink, layer)
        return lambda scale=None, q=None, **kw: inner(scale=(scale or q.shape[-1] ** -0.5) * (1.001 if layer == 11
                                                                                            else 1), q=q, **kw)

    import unittest.mock as mock

    with mock.patch.object(_sdpa_spy, "attention_report", off), pytest.raises(AssertionError, match="layer 11"):
        check_reference_attention("deep", pm)
