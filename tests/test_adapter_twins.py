"""timm Twins: SVT's locally-grouped windows (padded at the bottom and right) alternating with global
attention to keys sub-sampled by a stride-``sr`` conv, and PCPVT's sub-sampled attention alone.

Parity with timm's own softmax (fused and eager, native size and another) runs with the other
staged families in test_adapter_windowed.py. Here: each layer's geometry against the model itself
(which input token feeds which query and which key, by perturbing one token at a time), and the
closed forms of its layers through the engine's grouped path.
"""

from __future__ import annotations

import math

import pytest
import torch

import probekit as pk
from probekit.errors import UnsupportedArchitectureError
from probekit.geometry import LayerGeometry
from probekit.engine.probe import build_metrics
from probekit.testing import randomize_parameters
from probekit_tests_helpers import block, layer_value, mean_pair_distance, uniform, window_sums

TINY = dict(embed_dims=(16, 16, 32, 32), num_heads=(1, 2, 2, 2), depths=(2, 2, 2, 2), mlp_ratios=(1, 1, 1, 1))


def twins(kind: str, size, **kw) -> pk.ProbedModel:
    pm = pk.load(f"timm:twins_{kind}_small", pretrained=False, img_size=size, **{**TINY, **kw})
    randomize_parameters(pm.model, seed=0, scale=0.2)
    return pm


def attention_inputs(pm, x) -> list:
    """``(module, tokens, (h, w))`` each attention module receives in the model's forward."""
    seen = []
    mods = [m for _, m in pm.adapter.staged.attention(pm.model)]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach(), tuple(a[1])))) for m in mods]
    with torch.no_grad():
        pm.model(x)
    for h in hooks:
        h.remove()
    return seen


def fed_by(attn, x, size, sub, tokens) -> torch.Tensor:
    """``[N, M]`` bool: which of ``sub``'s M output tokens change when input token ``n`` is perturbed
    (one perturbed copy of the input per token, and the unperturbed one last)."""
    n = x.shape[1]
    xb = x.repeat(n + 1, 1, 1)
    xb[torch.arange(n), torch.arange(n)] += 1.0
    out = []
    hook = sub.register_forward_hook(lambda m, a, o: out.append(tokens(o)))
    with torch.no_grad():
        attn(xb, size)
    hook.remove()
    return (out[0][:n] - out[0][n:]).abs().amax(-1) > 0


def centres(cells: torch.Tensor, w: int, stride) -> torch.Tensor:
    return torch.stack([(cells // w + 0.5) * stride[0], (cells % w + 0.5) * stride[1]], -1).double()


@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_each_layers_geometry_is_where_the_model_reads_its_tokens(kind):
    # 96x64 px: grids 24x16, 12x8, 6x4, 3x2, all padded to 7x7 windows; sr 3 drops the last
    # column (16 = 5 * 3 + 1) and then two (8 = 2 * 3 + 2), which no key reads
    pm = twins(kind, (96, 64), sr_ratios=(3, 3, 2, 1))
    x = pm.example_input(1)
    geo = pm.geometry(x)
    kinds = []
    for i, (attn, tokens, size) in enumerate(attention_inputs(pm, x)):
        g = geo.layer(i)
        n = size[0] * size[1]
        stride = (96 // size[0], 64 // size[1])
        if isinstance(g, pk.TokenLayout):  # global over the stage's grid (sr 1)
            kinds.append("global")
            assert g.grid == size and g.patch_size == stride and g.num_prefix == 0
            assert torch.equal(fed_by(attn, tokens, size, attn.kv, lambda o: o), torch.eye(n, dtype=torch.bool))
            continue
        kinds.append(g.kind)
        assert g.grid == size and g.stride == stride
        if g.kind == "window":  # qkv of [B, windows, ws, ws] tokens: one input cell per token, pads from none
            fed = fed_by(attn, tokens, size, attn.qkv, lambda o: o.reshape(o.shape[0], -1, o.shape[-1]))
            cell = g.key_cell.reshape(-1)
            assert torch.equal(fed, cell[None] == torch.arange(n)[:, None])
            assert torch.equal(g.key_kind.reshape(-1) == 1, cell == -1)  # unfed tokens are padding
            real = cell >= 0
            assert torch.equal(g.key_pos.reshape(-1, 2)[real], centres(cell[real], size[1], stride))
        else:  # pooled: each key sits at the centre of the input cells its sr x sr conv reads
            fed = fed_by(attn, tokens, size, attn.sr, lambda o: o.flatten(2).transpose(1, 2)).double()
            assert fed.shape[1] == g.num_keys and g.key_grid == (size[0] // attn.sr_ratio, size[1] // attn.sr_ratio)
            want = fed.T @ centres(torch.arange(n), size[1], stride) / fed.sum(0)[:, None]
            torch.testing.assert_close(g.key_pos[0], want, rtol=0, atol=1e-9)
            assert int(fed.sum(0).min()) == int(fed.sum(0).max()) == attn.sr_ratio**2
            assert torch.equal(g.query_pos[0], centres(torch.arange(n), size[1], stride))
    want = ["window", "pooled"] if kind == "svt" else ["pooled", "pooled"]
    assert kinds == want * 3 + [want[0] if kind == "svt" else "global", "global"]
    assert geo.stage_starts() == [2, 4, 6]


def test_uniform_attention_in_one_window_is_the_global_closed_form_of_that_window():
    # SVT stage 1 at 224 px: 56x56 tokens of 4 px in 64 windows of 7x7, no padding
    geo = twins("svt", 224).geometry(torch.zeros(1, 3, 224, 224)).layer(0)
    assert (geo.kind, geo.groups, geo.window) == ("window", 64, (7, 7))
    want = mean_pair_distance(block(7, 7), block(7, 7), 4.0)
    assert want == pytest.approx(14.4379, abs=1e-4)
    lay = pk.TokenLayout(0, (7, 7), (4, 4))
    global_7x7 = pk.metrics.get("mad")().compute(torch.full((1, 1, 49, 49), 1 / 49), lay).item()
    assert global_7x7 == pytest.approx(want, rel=1e-6)
    assert layer_value("mad", geo, uniform(geo)).flatten().tolist() == pytest.approx([want] * 2, rel=1e-5)


def test_uniform_attention_in_a_padded_window_counts_only_its_real_tokens():
    # 96x64 px: 24x16 tokens in 7x7 windows -> 4x3 windows, the last row of windows 3 rows high and
    # the last column 2 wide; timm's padded tokens get attention too (their mass is distance 0)
    geo = twins("svt", (96, 64)).geometry(torch.zeros(1, 3, 96, 64)).layer(0)
    assert geo.groups == 12 and geo.queries_per_image() == 24 * 16
    windows = [block(h, w) for h in (7, 7, 7, 3) for w in (7, 7, 2)]
    m = build_metrics(["mad"])[0]
    per_window = window_sums(m, geo, uniform(geo, 1))[:, 0]
    for g, cells in enumerate(windows):
        k = len(cells)
        assert per_window[g].item() == pytest.approx(k * mean_pair_distance(cells, cells, 4.0) * k / 49, rel=1e-5)
    # renormalized over the real keys: each window's own global closed form (bottom-right: 3x2 of 4 px)
    corner = pk.metrics.get("mad")().compute(torch.full((1, 1, 6, 6), 1 / 6), pk.TokenLayout(0, (3, 2), (4, 4)))
    assert corner.item() == pytest.approx(mean_pair_distance(block(3, 2), block(3, 2), 4.0), rel=1e-6)
    renorm = build_metrics([{"mad": {"renormalize": True}}])[0]
    got = window_sums(renorm, geo, uniform(geo, 1), logits=uniform(geo, 1).log())[:, 0]
    assert got[-1].item() / 6 == pytest.approx(corner.item(), rel=1e-5)
    total = sum(len(c) * mean_pair_distance(c, c, 4.0) for c in windows) / (24 * 16)
    assert layer_value({"mad": {"renormalize": True}}, geo, uniform(geo)).flatten().tolist() == pytest.approx(
        [total] * 2, rel=1e-5)


def test_keys_subsampled_with_stride_2_against_brute_force():
    # PCPVT stage 3 at 224 px: 14x14 queries of 16 px, a 2x2 stride-2 conv -> 7x7 keys of 32 px cells
    geo = twins("pcpvt", 224).geometry(torch.zeros(1, 3, 224, 224)).layer(4)
    assert (geo.kind, geo.grid, geo.stride, geo.key_grid) == ("pooled", (14, 14), (16, 16), (7, 7))
    queries = [((r + 0.5) * 16, (c + 0.5) * 16) for r, c in block(14, 14)]
    keys = [tuple(sum(q[d] for q in cell) / 4 for d in (0, 1))  # the mean centre of the 2x2 cells it reads
            for cell in ([queries[(2 * i + a) * 14 + 2 * j + b] for a in (0, 1) for b in (0, 1)] for i, j in block(7, 7))]
    want = mean_pair_distance(queries, keys, 1.0)
    assert layer_value("mad", geo, uniform(geo)).flatten().tolist() == pytest.approx([want] * 2, rel=1e-5)
    # all attention on the key whose cell holds the query: every query is half a 16 px cell from it
    own = torch.zeros(1, 1, 196, 49)
    own[0, 0, torch.arange(196), [(r // 2) * 7 + c // 2 for r, c in block(14, 14)]] = 1
    assert layer_value("mad", geo, own).item() == pytest.approx(8 * math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("layer", [0, 6, 7], ids=["window-padded", "one-padded-window", "global-sr1"])
def test_identity_attention_is_zero_where_queries_are_keys(layer):
    pm = twins("svt", (96, 64))
    g = pm.geometry(pm.example_input(1)).layer(layer)
    if isinstance(g, pk.TokenLayout):
        eye = torch.eye(g.num_tokens).expand(2, 2, -1, -1)
        assert pk.metrics.get("mad")().compute(eye, g).abs().max().item() == 0
        return
    eye = torch.eye(g.num_queries).expand(2 * g.groups, 2, -1, -1).contiguous()
    assert layer_value("mad", g, eye).abs().max().item() == 0
    assert layer_value("entropy", g, eye).abs().max().item() == pytest.approx(0, abs=1e-6)


def test_probe_runs_every_layer_and_refuses_what_needs_global_attention():
    pm = twins("svt", (96, 64))
    x = pm.example_input(2)
    table = pk.probe(pm, x, metrics=["mad", "entropy", "distance_profile"]).table
    assert set(table.layer) == set(range(8))
    with pytest.raises(UnsupportedArchitectureError, match=r"needs global attention.*layer 0.*window"):
        pk.probe(pm, x, metrics=[{"rollout": {"query": "mean"}}])
    assert isinstance(pm.geometry(x).layer(1), LayerGeometry)
