"""Adapter conformance checks: the tap's probabilities against the library's reference, the
layout against the token count, batch independence, detaching, wanted layers, hidden states.

Each ``check_<property>(name, pm, **kw)`` takes a :class:`~probekit.adapter.ProbedModel` or an
:class:`~probekit.adapter.Adapter`; :func:`adapter_checks` yields those that apply.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch

from probekit.adapter import Adapter, CollectSink, ProbedModel
from probekit.engine.probe import probe
from probekit.engine.sink import ForwardDone, MetricSink
from probekit.testing.geometry_checks import check_hidden_keys, check_patch_geometry
from probekit.testing.hidden_checks import check_hidden_is_block_output
from probekit.testing.modes import check_eval_mode
from probekit.testing.preprocessing import LIBRARIES, check_preprocess, check_preprocess_matches_library
from probekit.testing.records import SkipCheck
from probekit.testing.reference import deviation, prefix_last_reference, scale_hint, shift_hint, tap_and_reference
from probekit.testing.tapping import adapter_of, kit_input, sized, tapped
from probekit.tokens import TokenLayout

__all__ = [
    "ATOL", "randomize_parameters", "adapter_checks",
    "check_rows_sum_to_one", "check_layout_matches_tokens", "check_reference_attention",
    "check_batch_independence", "check_tap_keeps_outputs", "check_tap_detaches", "check_wanted_layers",
    "check_stops_early", "check_hidden_states", "check_patch_geometry", "check_hidden_keys",
    "check_hidden_is_block_output",
    "check_eval_mode", "check_preprocess", "check_preprocess_matches_library",
]

ATOL = 1e-5  # probabilities: float32 softmax of the same logits agree to ~1e-7


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
    ph, pw = ad.layout(kit_input(ad, 1)).patch_size
    return (max(ph, h - ph), w + 2 * pw)


def _assert_close(name: str, what: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
    assert got.shape == want.shape, f"{name}: {what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    dev = (got.float().cpu() - want.float().cpu()).abs().max().item()
    assert dev <= atol, f"{name}: {what} deviates by {dev:.3g} (allowed {atol:g})"
    return dev


def _groups(geo, layer: int) -> int:
    """Attention groups (windows) per image of ``layer``: 1 for a global layer."""
    return 1 if geo.is_global(layer) else geo.layer(layer).groups


# -- adapter checks ------------------------------------------------------------------------------
@sized
def check_rows_sum_to_one(name: str, pm, image_size=None, atol: float = ATOL) -> None:
    # Metrics treat each query row as a distribution: probabilities must be float32, non-negative,
    # sum to 1 over keys, and cover every layer with num_heads heads.
    ad = adapter_of(pm)
    x = kit_input(ad, 2, image_size)
    probs = tapped(ad, x)[0].probs
    geo = ad.geometry(x)
    assert sorted(probs) == list(range(ad.num_layers)), (
        f"{name}: tapped layers {sorted(probs)}, expected 0..{ad.num_layers - 1}")
    for layer, p in probs.items():
        assert p.dtype == torch.float32, f"{name}: layer {layer} probabilities are {p.dtype}, not float32"
        # windowed layers come as [B * windows, H, Tw, Tw]; staged models have more heads in later stages
        shape = (2 * _groups(geo, layer), ad.num_heads if ad.global_attention else p.shape[1])
        assert p.dim() == 4 and p.shape[:2] == shape, f"{name}: layer {layer} shape {tuple(p.shape)}"
        assert p.min().item() >= 0, f"{name}: layer {layer} has negative probabilities"
        _assert_close(name, f"layer {layer} row sums", p.sum(-1), torch.ones(p.shape[:-1]), atol)


@sized
def check_layout_matches_tokens(name: str, pm, image_size=None) -> None:
    # Distances come from the layout: a wrong prefix count or grid shifts every position.
    ad = adapter_of(pm)
    x = kit_input(ad, 1, image_size)
    lay = ad.layout(x)
    assert isinstance(lay, TokenLayout), f"{name}: layout() returned {type(lay).__name__}, not TokenLayout"
    geo = ad.geometry(x)
    for layer, p in tapped(ad, x)[0].probs.items():
        g = geo.layer(layer)
        if not isinstance(g, TokenLayout):  # windows, pooled keys, class attention: the layer's own geometry
            ok = p.shape[0] == g.groups and (p.shape[-2], p.shape[-1]) == (g.num_queries, g.num_keys)
            assert ok, f"{name}: layer {layer} attention {tuple(p.shape)} does not fit its geometry ({g.describe()})"
            continue
        assert p.shape[-1] == p.shape[-2] == g.num_tokens, (
            f"{name}: layer {layer} has {p.shape[-1]} tokens at {tuple(x.shape[-2:])}, layout says "
            f"{g.describe()}"
        )


@sized
def check_reference_attention(name: str, pm, reference: Callable | None = None, image_size=None,
                              atol: float = ATOL) -> str:
    # The tap recomputes (or reads) probabilities; they must equal the library's own reference
    # attention (eager / need_weights / AttentionExtract), layer by layer and head by head. An
    # adapter without one is compared with the model's own softmax (or SDPA) calls in the same
    # forward, so a forgotten scale or bias fails either way. References are computed from the
    # same layer inputs as the tap (see Adapter.reference_attention): fused and unfused paths
    # drift apart through depth, and a check at full depth must measure the tap, not the drift.
    # A model that appends its prefix tokens (a class token last) matches with them moved to the
    # front, the layout's order (check_patch_geometry pins the patches' places).
    ad = adapter_of(pm)
    x = kit_input(ad, 2, image_size, seed=1)
    sink, ref, source = tap_and_reference(name, ad, x, reference)
    got = sink.probs
    assert sorted(ref) == sorted(got), f"{name}: {source} layers {sorted(ref)} != tapped {sorted(got)}"
    allowed = {i: max(atol, sink.rounding.get(i, 0.0)) for i in ref}  # float32 rounding of large logits (_KitSink)
    devs, moved_prefix, n = {i: deviation(got[i], ref[i]) for i in ref}, "", ad.layout(x).num_prefix
    last = prefix_last_reference(ref, n) if any(devs[i] > allowed[i] for i in ref) else None
    if last is not None and all(deviation(got[i], last[i]) <= allowed[i] for i in ref):
        devs = {i: deviation(got[i], last[i]) for i in ref}
        moved_prefix = f"; the model's last {n} token(s) (the prefix it appends) are the tap's first, as in the layout"
    bad = [i for i in ref if devs[i] > allowed[i]]
    if bad:
        i = bad[0]
        assert got[i].shape == ref[i].shape, (
            f"{name}: layer {i} shape {tuple(got[i].shape)} != {source} {tuple(ref[i].shape)}")
        raise AssertionError(f"{name}: layer {i} attention deviates from {source} by {devs[i]:.3g} (allowed "
                             f"{allowed[i]:.3g})" + (shift_hint(got, ref, allowed) or scale_hint(got[i], ref[i])))
    # near-uniform rows (random init) agree whatever the bug: report how peaked they were
    top = min(p.amax(-1).mean().item() * p.shape[-1] for p in got.values())
    per_layer = " ".join(f"{devs[i]:.1e}" for i in ref)
    return f"max |tap - {source}| per layer: {per_layer}; mean top probability {top:.1f}x uniform{moved_prefix}"


def check_batch_independence(name: str, pm, atol: float = ATOL) -> None:
    # Images must not see each other (padding masks, batch-norm, shuffled tokens): image i alone
    # gives the same attention as image i inside a batch.
    ad = adapter_of(pm)
    x = kit_input(ad, 3, seed=2)
    full = tapped(ad, x)[0].probs
    geo = ad.geometry(x)
    for i in (0, 2):
        alone = tapped(ad, x[i : i + 1])[0].probs
        for layer in full:
            g = _groups(geo, layer)  # an image's windows are rows i * g .. (i + 1) * g
            _assert_close(name, f"image {i} layer {layer} alone vs in a batch", alone[layer],
                          full[layer][i * g : (i + 1) * g], atol)


def check_tap_keeps_outputs(name: str, pm, atol: float = 1e-5) -> None:
    # The model must keep its own fast path under the tap: outputs with and without it agree.
    ad = adapter_of(pm)
    x = kit_input(ad, 2, seed=3)
    with torch.inference_mode():
        plain = _tensors(ad.forward(x))
    under = _tensors(tapped(ad, x)[1])
    assert plain and len(plain) == len(under), (
        f"{name}: forward returned {len(plain)} tensors, {len(under)} under the tap")
    for i, (a, b) in enumerate(zip(plain, under, strict=True)):
        scale = max(1.0, a.abs().max().item())
        _assert_close(name, f"output {i} under the tap (relative)", b / scale, a / scale, atol)


def check_tap_detaches(name: str, pm) -> None:
    # A tap that outlives its `with` block leaks hooks: later forwards would still call the sink.
    ad = adapter_of(pm)
    sink = CollectSink()
    with torch.inference_mode():
        with ad.tap(sink):
            pass
        ad.forward(kit_input(ad, 1))
    assert not sink.probs, f"{name}: the sink was called after its tap exited (layers {sorted(sink.probs)})"


def check_wanted_layers(name: str, pm) -> None:
    # The engine asks for a subset of layers (--layers); a tap must report only those.
    ad = adapter_of(pm)
    want = {ad.num_layers - 1}
    got = tapped(ad, kit_input(ad, 1), layers=want)[0].probs
    assert set(got) == want, f"{name}: asked for layers {sorted(want)}, the tap reported {sorted(got)}"


def check_stops_early(name: str, pm) -> None:
    # The engine ends a forward pass once every wanted layer has reported (probe's stop_early): the sink
    # raises ForwardDone from inside the model and the engine catches it around the forward, under the same
    # tap. The exception must come out of the adapter's forward; the next batch, under the same tap, must
    # report as if nothing had been left halfway; and once the tap is off the model must run as before.
    ad = adapter_of(pm)
    probed = pm if isinstance(pm, ProbedModel) else ProbedModel(ad, spec=ad.name or type(ad).__name__)
    x = kit_input(ad, 2, seed=4)
    with torch.inference_mode():
        before = _tensors(ad.forward(x))
    tripwire = _Tripwire(layers=[0])
    with torch.inference_mode(), ad.tap(tripwire):
        tripwire.start(ad.layout(x), ad.geometry(x))
        try:
            ad.forward(x)
        except ForwardDone:
            tripwire.stopped = True
    assert tripwire.stopped, (
        f"{name}: the forward pass ran to its end although layer 0, the only one wanted, had reported: "
        "something in the adapter's forward caught the sink's ForwardDone; let exceptions from the sink through")
    metrics = ["entropy"] + (["token_norms"] if ad.provides_hidden else [])
    for layers in (None, [0]):  # the last layer, and the first one (the rest of the model is never run)
        # one image a batch: the second forward runs under the tap that the first one left halfway
        tables = [probe(probed, x, metrics=metrics, layers=layers, batch_size=1 if stop else 2, stop_early=stop).table
                  for stop in (True, False)]
        stopped, whole = (t.sort_values(["metric", "image", "layer", "head"]).reset_index(drop=True)
                          for t in tables)
        keys = ["metric", "image", "layer", "head"]
        assert stopped[keys].equals(whole[keys]), (
            f"{name}: layers={layers}: the rows of forward passes stopped after the last wanted layer are not those "
            f"of whole ones: layers {sorted(set(stopped['layer']))} against {sorted(set(whole['layer']))}, "
            f"{len(stopped)} rows against {len(whole)}")
        a, b = (torch.tensor(t["value"].to_numpy(), dtype=torch.float64) for t in (stopped, whole))
        scale = max(1.0, b.abs().max().item())
        _assert_close(name, f"layers={layers}: values when the forward stops after the last wanted layer "
                      "(relative)", a / scale, b / scale, 1e-5)
    with torch.inference_mode():
        after = _tensors(ad.forward(x))
    assert len(after) == len(before), f"{name}: forward returned {len(after)} tensors after a stopped probe"
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        scale = max(1.0, a.abs().max().item())
        _assert_close(name, f"output {i} of a forward after a probe that stopped early (relative)", b / scale,
                      a / scale, 1e-6)


class _Tripwire(MetricSink):
    """A sink with no metric that asks for attention and stops after its wanted layers."""

    def __init__(self, layers):
        super().__init__([], layers=layers, stop_early=True)
        self.wants_attention = True
        self.stopped = False


def check_hidden_states(name: str, pm) -> None:
    # Hidden-state metrics (token norms, CKA) need each block's output tokens [B, T, D].
    ad = adapter_of(pm)
    if not ad.provides_hidden:
        raise SkipCheck(f"{name}: provides_hidden is False")
    x = kit_input(ad, 2)
    sink = tapped(ad, x, hidden=True)[0]
    hid, lays = sink.hiddens, ad.hidden_layouts(x)  # staged models: each block's own layout
    assert sorted(hid) == list(range(ad.num_layers)), f"{name}: hidden layers {sorted(hid)}"
    dims = {h.shape[-1] for h in hid.values()}
    for layer, h in hid.items():
        t = lays[layer].num_tokens
        assert h.dim() == 3 and h.shape[:2] == (2, t), (
            f"{name}: layer {layer} hidden shape {tuple(h.shape)}, expected [2, {t}, D]")
        assert torch.isfinite(h).all(), f"{name}: layer {layer} hidden states are not finite"
        assert sink.hidden_layouts.get(layer, lays[layer]) == lays[layer], (
            f"{name}: the tap gave layer {layer} the layout {sink.hidden_layouts[layer]}, "
            f"hidden_layouts() says {lays[layer]}")
    one_layout = len(set(lays.values())) == 1
    assert len(dims) == 1 or not one_layout, f"{name}: hidden widths differ across layers: {sorted(dims)}"


def adapter_checks(pm, reference: Callable | None = None) -> Iterator[Callable]:
    """The checks that apply to ``pm``, each a ``partial`` taking the model.

    The non-native size variants run when the adapter's ``variable_image_size`` is True (an
    ONNX graph with a fixed input size, or a wrapped tower with a fixed position table, sets
    it False on the instance); the hidden-state check runs when ``provides_hidden``.
    """
    ad = adapter_of(pm)
    yield check_eval_mode  # first: a model in train mode fails others for a reason only this one names
    yield check_preprocess
    if ad.library in LIBRARIES:
        yield check_preprocess_matches_library
    yield check_rows_sum_to_one
    yield check_layout_matches_tokens
    yield check_patch_geometry  # every layer, whatever its geometry (windows, pooled keys, class attention)
    if not ad.global_attention:
        yield check_hidden_keys
    yield functools.partial(check_reference_attention, reference=reference)
    if ad.variable_image_size:
        size = _non_native_size(ad)
        yield functools.partial(check_rows_sum_to_one, image_size=size)
        yield functools.partial(check_layout_matches_tokens, image_size=size)
        yield functools.partial(check_patch_geometry, image_size=size)
        yield functools.partial(check_reference_attention, reference=reference, image_size=size)
    yield check_batch_independence
    yield check_tap_keeps_outputs
    yield check_tap_detaches
    yield check_wanted_layers
    yield check_stops_early
    if ad.provides_hidden:
        yield check_hidden_states
        yield check_hidden_is_block_output
