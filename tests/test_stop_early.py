"""probe(stop_early=True): each forward pass ends once every wanted layer has reported.

What comes after the last wanted layer (later blocks, the final norm, the head) is read by no
metric; the values must be those of the whole forward pass, the tap must come off cleanly when the
model is left halfway, and a layer that never reports must mean no stop rather than a lost layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probekit as pk
from probekit.engine.sink import ForwardDone, MetricSink
from probekit.geometry import ModelGeometry
from probekit.tokens import TokenLayout


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return pk.load("timm:vit_small_patch16_224", pretrained=False, depth=4, embed_dim=96, num_heads=3,
                   img_size=64)


def _x(n=3, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _ran(pm):
    """Hooks that record which blocks (by index) and whether the head ran; returns (log, handles)."""
    log: list = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: log.append(i)) for i, b in enumerate(pm.model.blocks)]
    handles.append(pm.model.head.register_forward_hook(lambda m, a, o: log.append("head")))
    return log, handles


def _sorted(table):
    return table.sort_values(["metric", "image", "layer", "head"]).reset_index(drop=True)


@pytest.mark.parametrize("metrics, layers, runs", [
    (["mad", "entropy"], None, [0, 1, 2]),  # block 3 is left in its attention: its MLP and the head never run
    (["mad"], [1], [0]),  # block 1 is left in its attention: blocks 2, 3 and the head never run
    (["token_norms", "mad"], None, [0, 1, 2, 3]),  # block 3's output is wanted: it runs to its end, then no head
    (["token_norms"], [2], [0, 1, 2]),
])
def test_the_forward_stops_after_the_last_wanted_layer_with_the_same_values(vit, metrics, layers, runs):
    log, handles = _ran(vit)
    try:
        stopped = pk.probe(vit, _x(), metrics=metrics, layers=layers, batch_size=2)
        ran_stopped = list(log)
        log.clear()
        whole = pk.probe(vit, _x(), metrics=metrics, layers=layers, batch_size=2, stop_early=False)
        ran_whole = list(log)
    finally:
        for h in handles:
            h.remove()
    # batches of 2 and 1; a block is logged when it returns (these hooks run before the tap's), the head when it runs
    assert ran_stopped == runs + runs
    assert ran_whole == [0, 1, 2, 3, "head"] * 2
    a, b = _sorted(stopped.table), _sorted(whole.table)
    assert len(a) == len(b) > 0
    assert a[["metric", "image", "layer", "head"]].equals(b[["metric", "image", "layer", "head"]])
    np.testing.assert_array_equal(a["value"].to_numpy(), b["value"].to_numpy())


def test_mad_of_a_stopped_forward_equals_the_reference(vit):
    x = _x(2, seed=3)
    res = pk.probe(vit, x, metrics=["mad"], layers=[2])
    probs = vit.adapter.reference_attention(x)[2].double()[:, :, 1:, 1:]  # the CLS row and key dropped
    i = torch.arange(16)
    yx = torch.stack([i // 4, i % 4], -1).double() * 16
    want = (probs * torch.cdist(yx, yx)).sum(-1).mean(-1)  # [B, H]
    got = _sorted(res.table)["value"].to_numpy().reshape(2, 3)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-5)


def test_after_a_stopped_probe_the_model_runs_as_before(vit):
    x = _x(2, seed=5)
    with torch.inference_mode():
        before = vit.model(x)
    sdpa = F.scaled_dot_product_attention
    pk.probe(vit, x, metrics=["mad"], layers=[0])
    assert F.scaled_dot_product_attention is sdpa  # the spy is off
    assert not any(b.attn._forward_pre_hooks or b.attn._forward_hooks for b in vit.model.blocks)
    with torch.inference_mode():
        after = vit.model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_transformers_model_stops_with_the_same_values():
    pm = pk.load("hf:google/vit-base-patch16-224", pretrained=False,
                 config={"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                         "intermediate_size": 64, "image_size": 32, "patch_size": 8})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ran: list = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, layer in enumerate(pm.model.layers)]
    try:
        stopped = pk.probe(pm, x, metrics=["mad", "token_norms"], layers=[1])
        assert ran == [0, 1]  # block 1's output is wanted: it returns, and block 2 never runs
        whole = pk.probe(pm, x, metrics=["mad", "token_norms"], layers=[1], stop_early=False)
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_array_equal(_sorted(stopped.table)["value"].to_numpy(), _sorted(whole.table)["value"].to_numpy())


class _Attn:
    """A layer record stand-in for a metric-less sink (only the observer-free bookkeeping runs)."""


def _sink(layers=None, num_layers=3, **kw):
    sink = MetricSink([], layers=layers, stop_early=True, **kw)
    sink.wants_attention = True
    sink._attention = lambda layer, attn: None  # no metric work: the stop's bookkeeping alone
    layout = TokenLayout(1, (2, 2), (16, 16))
    return sink, layout, ModelGeometry(layout, num_layers=num_layers)


def test_the_sink_stops_only_once_every_wanted_layer_reported_in_any_order():
    sink, layout, geometry = _sink()
    sink.start(layout, geometry)
    sink.attention(2, _Attn())  # the last layer first (a model that runs its blocks out of order)
    sink.attention(0, _Attn())
    with pytest.raises(ForwardDone):
        sink.attention(1, _Attn())
    sink.start(layout, geometry)  # each batch waits for all of them again
    sink.attention(0, _Attn())
    sink.attention(1, _Attn())
    with pytest.raises(ForwardDone):
        sink.attention(2, _Attn())


def test_a_layer_that_never_reports_means_no_stop():
    sink, layout, geometry = _sink(layers=[0, 2])
    sink.start(layout, geometry)
    sink.attention(0, _Attn())
    sink.attention(1, _Attn())  # not wanted: still waiting for layer 2
    sink.attention(0, _Attn())
    sink.finish()
    sink.start(layout)  # no per-layer geometry: the layer count is unknown, so no stop at all
    for layer in range(5):
        sink.attention(layer, _Attn())
    sink.finish()


def test_a_sink_waits_for_block_outputs_too():
    sink, layout, geometry = _sink(num_layers=2)
    sink.wants_hidden = True
    sink.start(layout, geometry)
    sink.attention(0, _Attn())
    sink.hidden(0, torch.zeros(1, 5, 4))
    sink.attention(1, _Attn())  # layer 1's block output is still to come
    with pytest.raises(ForwardDone):
        sink.hidden(1, torch.zeros(1, 5, 4))


def test_the_last_layer_of_a_stopped_forward_gets_no_output_from_the_c_pass(monkeypatch):
    """At 197 tokens the C kernel's pass takes every layer (probekit/engine/kernels/cpu_pass.py); the last one a
    stopped forward waits for needs no output, so no P V is made for it: the same values as a whole forward."""
    from probekit.engine.kernels import cpu_pass

    torch.manual_seed(0)
    pm = pk.load("timm:vit_small_patch16_224", pretrained=False, depth=3, embed_dim=48, num_heads=2)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    asked: list[bool] = []
    run = cpu_pass.Prepared.run

    def counting(self, attn, output=True):
        asked.append(output)
        return run(self, attn, output)

    monkeypatch.setattr(cpu_pass.Prepared, "run", counting)
    stopped = pk.probe(pm, x, metrics=["mad", "entropy"])
    assert asked == [True, True, False]
    asked.clear()
    whole = pk.probe(pm, x, metrics=["mad", "entropy"], stop_early=False)
    assert asked == [True, True, True]
    np.testing.assert_array_equal(_sorted(stopped.table)["value"].to_numpy(), _sorted(whole.table)["value"].to_numpy())
