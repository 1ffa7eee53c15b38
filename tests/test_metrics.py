"""The metric suite: closed forms, brute-force references, merging, and the engine paths.

Every metric is checked three ways: values known in closed form (identity, uniform,
neighbourhood attention), a straightforward loop over small random attention (the
definition written as plainly as possible, in float64), and the engine (row blocks, merged
halves, ``pk.probe`` on a tiny model) agreeing with a direct ``compute``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import probekit as pk
from probekit.adapter import Adapter, ProbedModel, wants
from probekit.attention import LayerAttention
from probekit.errors import ConfigError, LayoutError, UnsupportedArchitectureError
from probekit.engine.probe import MetricSink
from probekit.metric import Block
from probekit.metric.base import query_span
from probekit.plugins.metrics.distance import DistanceProfile, MeanAttentionDistance
from probekit.plugins.metrics.entropy import AttentionEntropy
from probekit.plugins.metrics.heads import HeadSimilarity, pairwise_js
from probekit.plugins.metrics.hidden import LinearCKA, TokenNorms, cka_between, hsic_matrix
from probekit.plugins.metrics.information import NormalizedMutualInformation
from probekit.plugins.metrics.maps import AttentionRollout, ClsMap, rollout
from probekit.plugins.metrics.prefix import PrefixMass

ATTENTION_METRICS = ["mad", "distance_profile", "entropy", "prefix_mass", "nmi", "head_similarity", "cls_map", "rollout"]
HIDDEN_METRICS = ["token_norms", "cka"]


def lay(p=1, grid=(3, 4), patch=16, kinds=None) -> pk.TokenLayout:
    return pk.TokenLayout(num_prefix=p, grid=grid, patch_size=patch, prefix_kinds=kinds)


def rand_qk(b, h, t, d=8, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g) * sharp
    k = torch.randn(b, h, t, d, generator=g) * sharp
    return q, k


def rand_probs(b, h, t, seed=0, sharp=2.0):
    q, k = rand_qk(b, h, t, seed=seed, sharp=sharp)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)


def uniform(t, b=1, h=1):
    return torch.full((b, h, t, t), 1.0 / t)


def pos(layout, n):
    """(row, col) of patch n."""
    return divmod(n, layout.grid[1])


def through_sink(metric, layers, layout, hidden=None, block_mb=256.0):
    """Run one batch through the engine's MetricSink; ``layers``: list of (q, k) or probs."""
    sink = MetricSink([metric], block_mb=block_mb)
    sink.start(layout)
    for i, x in enumerate(layers):
        attn = LayerAttention(probs_given=x) if torch.is_tensor(x) else LayerAttention(q=x[0], k=x[1], scale=x[0].shape[-1] ** -0.5)
        sink.attention(i, attn)
    for i, x in enumerate(hidden or []):
        sink.hidden(i, x)
    return sink.finish()[metric.label]


# -- MAD ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,patch,expected", [((14, 14), 16, 116.49), ((16, 16), 14, 116.57), ((7, 7), 32, 115.50)])
def test_mad_uniform_closed_forms(grid, patch, expected):
    n = grid[0] * grid[1]
    v = MeanAttentionDistance().compute(uniform(n), lay(0, grid, patch)).item()
    assert v == pytest.approx(expected, abs=0.005)


def test_mad_identity_and_prefix_handling():
    full = lay(1, (14, 14), 16)
    assert MeanAttentionDistance().compute(torch.eye(197)[None, None], full).item() == 0
    base = MeanAttentionDistance().compute(uniform(196), lay(0, (14, 14), 16)).item()
    raw = MeanAttentionDistance().compute(uniform(197), full).item()
    ren = MeanAttentionDistance(renormalize=True).compute(uniform(197), full).item()
    assert raw == pytest.approx(196 / 197 * 116.49, abs=0.005)
    # (float32 sums over the 196 x 197 block in one matrix-vector product: 1e-5 relative)
    assert raw == pytest.approx(196 / 197 * base, rel=1e-5)
    assert ren == pytest.approx(base, rel=1e-5)


def test_mad_neighbourhood_attention():
    layout = lay(0, (5, 5), 16)
    a = torch.zeros(25, 25)
    for q in range(25):
        r, c = pos(layout, q)
        nb = [k for k in range(25) if abs(pos(layout, k)[0] - r) <= 1 and abs(pos(layout, k)[1] - c) <= 1]
        a[q, nb] = 1 / len(nb)
    mad = MeanAttentionDistance()  # each query row's value: a block of that one row
    rows = torch.cat([mad.row_values(Block(rows=slice(q, q + 1), layout=layout, probs=a[None, None, q : q + 1]))[0, 0]
                      for q in range(25)])
    interior = [q for q in range(25) if 0 < pos(layout, q)[0] < 4 and 0 < pos(layout, q)[1] < 4]
    assert rows[interior].tolist() == pytest.approx([17.17] * 9, abs=0.005)
    assert (64 + 64 * math.sqrt(2)) / 9 == pytest.approx(17.17, abs=0.005)


def _mad_loops(probs, layout, renorm=False, units="px", cls=False):
    p, (h, w) = layout.num_prefix, layout.grid
    ph, pw = layout.patch_size
    scale = {"px": 1.0, "patch": 1.0, "fraction": 1.0 / (max(h, w) - 1)}[units]
    sy, sx = (ph, pw) if units == "px" else (1, 1)
    a = probs.double().numpy()
    out = np.zeros(a.shape[:2])
    queries = [None] if cls else range(layout.num_patches)
    for b, hd in itertools.product(range(a.shape[0]), range(a.shape[1])):
        tot = 0.0
        for q in queries:
            row = a[b, hd, 0 if cls else p + q, p:]
            if renorm:
                row = row / row.sum()
            for k in range(layout.num_patches):
                (r1, c1), (r2, c2) = ((h - 1) / 2, (w - 1) / 2) if cls else pos(layout, q), pos(layout, k)
                tot += row[k] * math.hypot((r1 - r2) * sy, (c1 - c2) * sx) * scale
        out[b, hd] = tot / len(queries)
    return out


@pytest.mark.parametrize("units", ["px", "patch", "fraction"])
@pytest.mark.parametrize("renorm", [False, True])
def test_mad_rectangular_grid_matches_loops(units, renorm):
    layout = lay(2, (5, 9), (16, 14), kinds=("cls", "dist"))
    probs = rand_probs(2, 3, layout.num_tokens, seed=1)
    got = MeanAttentionDistance(renormalize=renorm, units=units).compute(probs, layout).double().numpy()
    np.testing.assert_allclose(got, _mad_loops(probs, layout, renorm, units), rtol=1e-5)


def test_mad_units_relations():
    layout = lay(1, (5, 9), 16)
    probs = rand_probs(1, 2, layout.num_tokens, seed=2)
    px = MeanAttentionDistance().compute(probs, layout)
    patch = MeanAttentionDistance(units="patch").compute(probs, layout)
    frac = MeanAttentionDistance(units="fraction").compute(probs, layout)
    torch.testing.assert_close(patch, px / 16)
    torch.testing.assert_close(frac, patch / 8)  # max(h, w) - 1


@pytest.mark.parametrize("units", ["px", "fraction"])
def test_mad_cls_queries_distance_from_centre(units):
    layout = lay(1, (4, 6), 16)
    probs = rand_probs(2, 2, layout.num_tokens, seed=3)
    m = MeanAttentionDistance(queries="cls", units=units)
    assert m.query_tokens == "cls" and query_span(m, layout) == slice(0, 1)
    np.testing.assert_allclose(m.compute(probs, layout).double().numpy(), _mad_loops(probs, layout, units=units, cls=True), rtol=1e-5)
    # uniform CLS attention on an even grid: mean distance of patch centres from the centre
    u = MeanAttentionDistance(queries="cls", units="patch").compute(uniform(25), lay(1, (4, 6), 16)).item()
    assert u * 25 / 24 == pytest.approx(np.mean([math.hypot(r - 1.5, c - 2.5) for r in range(4) for c in range(6)]), rel=1e-5)
    with pytest.raises(LayoutError, match="no CLS"):
        query_span(m, lay(0, (4, 6), 16))


def test_mad_options_validated():
    with pytest.raises(ConfigError, match="queries"):
        MeanAttentionDistance(queries="tokens")
    assert MeanAttentionDistance(queries="cls").label == "mad[queries=cls]"


# -- entropy -------------------------------------------------------------------------------------

def test_entropy_closed_forms():
    layout = lay(1, (14, 14), 16)
    assert AttentionEntropy().compute(uniform(197), layout).item() == pytest.approx(math.log(196), abs=1e-5)
    assert AttentionEntropy().compute(uniform(197), layout).item() == pytest.approx(5.278, abs=5e-4)
    assert AttentionEntropy(normalized=True).compute(uniform(197), layout).item() == pytest.approx(1.0, abs=1e-6)
    assert AttentionEntropy().compute(torch.eye(197)[None, None], layout).item() == 0


def test_entropy_matches_loops():
    layout = lay(2, (3, 5), 16)
    probs = rand_probs(2, 3, layout.num_tokens, seed=4)
    a = probs.double().numpy()
    ref = np.zeros((2, 3))
    for b, h in itertools.product(range(2), range(3)):
        for q in range(2, layout.num_tokens):
            row = a[b, h, q, 2:] / a[b, h, q, 2:].sum()
            ref[b, h] -= sum(x * math.log(x) for x in row) / layout.num_patches
    np.testing.assert_allclose(AttentionEntropy().compute(probs, layout).numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(AttentionEntropy(normalized=True).compute(probs, layout).numpy(), ref / math.log(15), rtol=1e-5)


# -- prefix mass ---------------------------------------------------------------------------------

def test_prefix_mass_closed_forms_and_kinds():
    kinds = ("cls", "dist", "reg", "reg")
    layout = lay(4, (3, 3), 16, kinds=kinds)
    u = uniform(13)
    assert PrefixMass().compute(u, layout).item() == pytest.approx(4 / 13)
    assert PrefixMass(kind="cls").compute(u, layout).item() == pytest.approx(1 / 13)
    assert PrefixMass(kind="reg").compute(u, layout).item() == pytest.approx(2 / 13)
    assert PrefixMass().compute(uniform(9), lay(0, (3, 3))).item() == 0
    assert PrefixMass(kind="dist").compute(uniform(10), lay(1, (3, 3))).item() == 0
    with pytest.raises(ConfigError, match="kind"):
        PrefixMass(kind="register")


def test_prefix_mass_matches_loops():
    kinds = ("cls", "reg", "reg")
    layout = lay(3, (2, 3), 16, kinds=kinds)
    probs = rand_probs(2, 2, layout.num_tokens, seed=5)
    for kind in ("all", "cls", "reg", "dist"):
        ref = np.zeros((2, 2))
        for b, h, q in itertools.product(range(2), range(2), range(3, 9)):
            ref[b, h] += sum(probs[b, h, q, j].item() for j in range(3) if kind in ("all", kinds[j])) / 6
        np.testing.assert_allclose(PrefixMass(kind=kind).compute(probs, layout).numpy(), ref, rtol=1e-5, atol=1e-7)


def test_unrenormalized_mad_is_prefix_weighted_renormalized_mad():
    layout = lay(2, (4, 5), 16, kinds=("cls", "dist"))
    probs = rand_probs(2, 3, layout.num_tokens, seed=6, sharp=3.0)
    rows = slice(2, layout.num_tokens)
    r = probs[:, :, rows]
    mass = PrefixMass().row_values(Block(rows=rows, layout=layout, probs=r))
    ren = MeanAttentionDistance(renormalize=True).row_values(Block(rows=rows, layout=layout, probs=r))
    raw = MeanAttentionDistance().compute(probs, layout)
    torch.testing.assert_close(raw, ((1 - mass) * ren).mean(-1), rtol=1e-5, atol=1e-4)
    assert mass.mean() > 0.05  # the relation is not trivially true


# -- distance profile ----------------------------------------------------------------------------

def test_distance_profile_sums_to_patch_mass_and_matches_loops():
    layout = lay(1, (4, 5), (16, 14))
    probs = rand_probs(2, 2, layout.num_tokens, seed=7)
    edges = [0, 10, 16, 30, 45]
    got = DistanceProfile(bins=edges).compute(probs, layout)
    assert got.shape == (2, 2, 5)
    torch.testing.assert_close(got.sum(-1), 1 - PrefixMass().compute(probs, layout))
    ref = np.zeros((2, 2, 5))
    for b, h, q, k in itertools.product(range(2), range(2), range(20), range(20)):
        (r1, c1), (r2, c2) = pos(layout, q), pos(layout, k)
        d = math.hypot((r1 - r2) * 16, (c1 - c2) * 14)
        i = max(j for j, e in enumerate(edges) if d >= e - 1e-9)
        ref[b, h, i] += probs[b, h, 1 + q, 1 + k].item() / 20
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)


def test_distance_profile_edges_and_mean():
    layout = lay(0, (14, 14), 16)
    prof = DistanceProfile().compute(torch.eye(196)[None, None], layout)[0, 0]
    assert prof[0].item() == 1 and prof.sum().item() == 1  # identity: all mass at distance 0
    # distance exactly on an edge (one patch right = 16 px, 3-4-5 triangle = 80 px) falls in the upper bin
    a = torch.zeros(1, 1, 196, 196)
    a[..., 0, 1] = 0.5
    a[..., 0, 3 * 14 + 4] = 0.5
    block = Block(rows=slice(0, 1), layout=layout, probs=a[:, :, :1])
    row = DistanceProfile(bins=[0, 16, 80, 81]).row_values(block)[0, 0, 0]
    assert row.tolist() == [0, 0.5, 0.5, 0]
    # in fraction units 1 step on an 11-wide grid is 0.1, whose square rounds above 0.1 ** 2
    small = lay(0, (11, 11), 16)
    one = torch.zeros(1, 1, 1, 121)
    one[..., 1] = 1
    block = Block(rows=slice(0, 1), layout=small, probs=one)
    assert DistanceProfile(bins=[0, 0.1, 0.2], units="fraction").row_values(block)[0, 0, 0].tolist() == [0, 1, 0]
    fine = DistanceProfile(bins=[i / 4 for i in range(0, 2000)], units="patch").compute(uniform(196), layout)[0, 0]
    centres = torch.arange(2000) / 4
    assert (fine * centres).sum().item() == pytest.approx(116.49 / 16, abs=0.13)  # MAD is the profile's mean
    for bad in ([16, 32], [0, 32, 16], "x"):
        with pytest.raises(ConfigError, match="bins"):
            DistanceProfile(bins=bad)


# -- NMI -----------------------------------------------------------------------------------------

def test_nmi_closed_forms():
    layout = lay(1, (4, 4), 16)
    assert NormalizedMutualInformation().compute(torch.eye(17)[None, None], layout).item() == pytest.approx(1.0, abs=1e-6)
    assert NormalizedMutualInformation().compute(uniform(17), layout).item() == pytest.approx(0.0, abs=1e-6)
    row = torch.softmax(torch.randn(17, generator=torch.Generator().manual_seed(0)) * 3, -1)
    same = row.expand(1, 1, 17, 17)
    assert NormalizedMutualInformation().compute(same, layout).item() == pytest.approx(0.0, abs=1e-5)
    # two clusters of queries, each attending uniformly to its own half: I = ln 2, H(k) = ln 16
    a = torch.zeros(17, 17)
    a[1:9, 1:9], a[9:, 9:] = 1 / 8, 1 / 8
    expected = math.log(2) / math.sqrt(math.log(16) * math.log(16))
    assert NormalizedMutualInformation().compute(a[None, None], layout).item() == pytest.approx(expected, rel=1e-5)


def test_nmi_matches_loops_and_blocks():
    layout = lay(1, (3, 3), 16)
    probs = rand_probs(2, 2, 10, seed=8)
    a = probs.double().numpy()
    ref = np.zeros((2, 2))
    for b, h in itertools.product(range(2), range(2)):
        rows = [a[b, h, q, 1:] / a[b, h, q, 1:].sum() for q in range(1, 10)]
        pk_ = [sum(r[k] for r in rows) / 9 for k in range(9)]
        mi = sum(r[k] / 9 * math.log(r[k] / pk_[k]) for r in rows for k in range(9))
        hk = -sum(x * math.log(x) for x in pk_)
        ref[b, h] = mi / math.sqrt(math.log(9) * hk)
    m = NormalizedMutualInformation()
    np.testing.assert_allclose(m.compute(probs, layout).numpy(), ref, rtol=1e-4)
    m.block_bytes = 1  # one query row per block
    np.testing.assert_allclose(m.compute(probs, layout).numpy(), ref, rtol=1e-4)


# -- head similarity -----------------------------------------------------------------------------

def test_head_similarity_closed_forms():
    layout = lay(0, (2, 2), 16)
    same = rand_probs(1, 1, 4, seed=9).expand(1, 3, 4, 4)
    assert HeadSimilarity().compute(same, layout).abs().max().item() < 1e-6
    one = torch.zeros(1, 2, 4, 4)
    one[:, 0, :, 0], one[:, 1, :, 3] = 1, 1
    torch.testing.assert_close(HeadSimilarity().compute(one, layout), torch.full((1, 2), math.log(2)))
    assert torch.isnan(HeadSimilarity().compute(uniform(4), layout)).all()


@pytest.mark.parametrize("renorm", [False, True])
def test_head_similarity_matches_scipy_loops(renorm):
    from scipy.spatial.distance import jensenshannon

    layout = lay(1, (2, 3), 16)
    probs = rand_probs(2, 4, 7, seed=10)
    a = probs.double().numpy()
    ref = np.zeros((2, 4))
    for b, h in itertools.product(range(2), range(4)):
        for g in range(4):
            if g == h:
                continue
            for q in range(1, 7):
                x, y = (a[b, h, q, 1:], a[b, g, q, 1:]) if renorm else (a[b, h, q], a[b, g, q])
                ref[b, h] += jensenshannon(x, y) ** 2 / 3 / 6  # scipy normalizes and returns sqrt(JS)
    np.testing.assert_allclose(HeadSimilarity(renormalize=renorm).compute(probs, layout).numpy(), ref, rtol=1e-4, atol=1e-7)


def test_pairwise_js_row_slices_agree():
    a = rand_probs(2, 5, 11, seed=11)
    torch.testing.assert_close(pairwise_js(a, budget_bytes=1), pairwise_js(a))


# -- maps ----------------------------------------------------------------------------------------

def test_cls_map_values_and_queries():
    layout = lay(1, (3, 4), 16)
    probs = rand_probs(2, 2, 13, seed=12)
    cls = ClsMap().compute(probs, layout)
    assert cls.shape == (2, 2, 3, 4)
    assert cls[1, 0, 2, 1].item() == probs[1, 0, 0, 1 + 2 * 4 + 1].item()
    mean = ClsMap(query="mean").compute(probs, layout)
    torch.testing.assert_close(mean, probs[:, :, 1:, 1:].mean(2).reshape(2, 2, 3, 4))
    ren = ClsMap(renormalize=True).compute(probs, layout)
    torch.testing.assert_close(ren.sum((-1, -2)), torch.ones(2, 2))
    with pytest.raises(LayoutError, match="no CLS"):
        ClsMap().compute(uniform(12), lay(0, (3, 4)))
    with pytest.raises(UnsupportedArchitectureError, match="cls_map"):  # refused before the forward pass
        MetricSink([ClsMap()]).start(lay(0, (3, 4)))
    MetricSink([ClsMap(query="mean")]).start(lay(0, (3, 4)))  # the mean over query patches needs no CLS
    with pytest.raises(ConfigError, match="query"):
        ClsMap(query="first")


def _rollout_loops(layers, layout, query="cls"):
    p = layout.num_prefix
    out, run = [], None
    for x in layers:
        w = x.double().numpy().mean(1)  # [B, T, T]
        a = 0.5 * w + 0.5 * np.eye(w.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        run = a if run is None else np.stack([a[b] @ run[b] for b in range(len(a))])
        row = run[:, 0, p:] if query == "cls" else run[:, p:, p:].mean(1)
        out.append(row.reshape(len(a), *layout.grid))
    return out


@pytest.mark.parametrize("query", ["cls", "mean"])
def test_rollout_matches_loops_and_engine(query):
    layout = lay(1, (2, 3), 16)
    layers = [rand_qk(2, 3, 7, seed=s) for s in range(3)]
    probs = [torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) for q, k in layers]
    ref = _rollout_loops(probs, layout, query)
    for got, want in zip(rollout(probs, layout, query), ref):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    m = AttentionRollout(query=query)
    vals = through_sink(m, layers, layout, block_mb=1e-4)
    assert sorted(vals) == [0, 1, 2]
    for i in range(3):
        np.testing.assert_allclose(vals[i].numpy(), ref[i], rtol=1e-5)
    # identity attention: nothing flows, the CLS row over patches stays 0
    assert rollout([torch.eye(7)[None, None]] * 2, layout)[-1].abs().max().item() == 0


def test_rollout_needs_every_layer():
    layout = lay(1, (2, 2), 16)
    sink = MetricSink([AttentionRollout()])
    sink.start(layout)
    with pytest.raises(ConfigError, match="every layer"):
        sink.attention(1, LayerAttention(probs_given=uniform(5)))


# -- hidden-state metrics ------------------------------------------------------------------------

def test_token_norms_matches_loops():
    layout = lay(1, (3, 3), 16)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 10, 16, generator=g)
    x[0, 3] *= 10
    x[1, [2, 5, 7]] *= 3
    x[2, 0] *= 100  # a prefix token: never counted
    share = TokenNorms().on_hidden(0, x, layout)
    ratio = TokenNorms(statistic="max_ratio").on_hidden(0, x, layout)
    for b in range(3):
        n = sorted(float(np.linalg.norm(x[b, t].numpy())) for t in range(1, 10))
        med = n[4]
        assert share[b].item() == pytest.approx(sum(v > 2 * med for v in n) / 9)
        assert ratio[b].item() == pytest.approx(max(n) / med, rel=1e-5)
    assert share[0].item() == pytest.approx(1 / 9) and share[1].item() >= 2 / 9
    for bad in ({"threshold": 0.5}, {"threshold": "x"}, {"statistic": "mean"}):
        with pytest.raises(ConfigError):
            TokenNorms(**bad)


def _hsic_u_statistic(k, l):
    """HSIC_1 as the U-statistic of Song et al. 2012 (Theorem 2): an average over distinct 4-tuples."""
    n, tot, cnt = len(k), 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        tot += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        cnt += 1
    return tot / cnt


def test_hsic_matches_u_statistic():
    g = torch.Generator().manual_seed(14)
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    got = hsic_matrix(k[None], l[None])[0, 0].item()
    assert got == pytest.approx(_hsic_u_statistic(k.numpy(), l.numpy()), rel=1e-9)


def _cka_run(batches, pool="mean", layout=None):
    """Minibatch LinearCKA over minibatches of hidden states: ``batches`` = list of {layer: [n, T, D]}."""
    layout = layout or lay(1, (2, 2), 16)
    m = LinearCKA(pool=pool, estimator="minibatch")
    for hs in batches:
        sink = MetricSink([m])
        sink.start(layout)
        for i, h in sorted(hs.items()):
            sink.hidden(i, h)
        sink.finish()
    return m


def test_cka_invariances_and_reference():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(12, 5, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    y = torch.randn(12, 5, 4, generator=g, dtype=torch.float64)
    hs = {0: x, 1: 3.5 * x @ q, 2: y}
    m = _cka_run([{i: h[s : s + 6] for i, h in hs.items()} for s in (0, 6)])
    c = m.result()[-1]
    assert c.shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(c), torch.ones(3))
    assert c[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    # the reference: per-minibatch U-statistic HSIC of mean-pooled patch tokens, ratio of sums
    feats = {i: h[:, 1:].mean(1) for i, h in hs.items()}
    def s(i, j):
        return sum(_hsic_u_statistic((feats[i][a:a + 6] @ feats[i][a:a + 6].T).numpy(),
                                     (feats[j][a:a + 6] @ feats[j][a:a + 6].T).numpy()) for a in (0, 6))
    assert c[0, 2].item() == pytest.approx(s(0, 2) / math.sqrt(s(0, 0) * s(2, 2)), rel=1e-5)
    assert abs(c[0, 2].item()) < 0.9


def test_cka_full_batch_flatten_and_merge():
    g = torch.Generator().manual_seed(16)
    hs = {0: torch.randn(8, 5, 3, generator=g), 1: torch.randn(8, 5, 3, generator=g)}
    one = _cka_run([hs], pool="flatten")
    f = {i: h[:, 1:].reshape(8, -1).double() for i, h in hs.items()}
    ref = [[_hsic_u_statistic((f[i] @ f[i].T).numpy(), (f[j] @ f[j].T).numpy()) for j in (0, 1)] for i in (0, 1)]
    assert one.result()[-1][0, 1].item() == pytest.approx(ref[0][1] / math.sqrt(ref[0][0] * ref[1][1]), rel=1e-5)
    a = _cka_run([{i: h[:4] for i, h in hs.items()}], pool="flatten")
    b = _cka_run([{i: h[4:] for i, h in hs.items()}], pool="flatten")
    both = _cka_run([{i: h[:4] for i, h in hs.items()}, {i: h[4:] for i, h in hs.items()}], pool="flatten")
    merged = LinearCKA(pool="flatten", estimator="minibatch").merge(a).merge(b.state_dict())
    torch.testing.assert_close(merged.result()[-1], both.result()[-1])
    with pytest.warns(UserWarning, match="at least 4"):
        short = _cka_run([{i: h[:3] for i, h in hs.items()}])
    assert short.skipped == 3 and short.dataset_result() is None


# -- engine paths: row blocks and merged halves ----------------------------------------------------

def _metric(name):
    return pk.metrics.get(name)()


@pytest.mark.parametrize("name", ATTENTION_METRICS)
def test_engine_blocks_and_merge_equal_one_pass(name):
    layout = lay(1, (3, 4), 16)
    layers = [rand_qk(4, 2, 13, seed=20 + i) for i in range(2)]
    probs = [torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) for q, k in layers]
    whole = _metric(name)
    vals = through_sink(whole, layers, layout)
    blocked = through_sink(_metric(name), layers, layout, block_mb=1e-4)  # one query row per block
    direct = rollout(probs, layout) if name == "rollout" else [whole.compute(p, layout) for p in probs]
    for i in range(2):
        torch.testing.assert_close(vals[i], direct[i], rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(blocked[i], direct[i], rtol=1e-5, atol=1e-6, equal_nan=True)
    halves = [_metric(name), _metric(name)]
    for m, s in zip(halves, (slice(0, 1), slice(1, 4))):
        through_sink(m, [(q[s], k[s]) for q, k in layers], layout)
    merged = _metric(name).merge(halves[0]).merge(halves[1].state_dict())
    for i, v in whole.result().items():
        torch.testing.assert_close(merged.result()[i], v, equal_nan=True)


@pytest.mark.parametrize("name", HIDDEN_METRICS)
def test_hidden_metrics_merge_equal_one_pass(name):
    layout = lay(1, (2, 2), 16)
    g = torch.Generator().manual_seed(30)
    hidden = [torch.randn(8, 5, 6, generator=g) for _ in range(3)]
    whole = _metric(name)
    through_sink(whole, [], layout, hidden=hidden)
    halves = [_metric(name), _metric(name)]
    for m, s in zip(halves, (slice(0, 4), slice(4, 8))):
        through_sink(m, [], layout, hidden=[h[s] for h in hidden])
    merged = _metric(name).merge(halves[0]).merge(halves[1])  # cka: the whole-set estimator, exact over halves
    for i, v in whole.result().items():
        torch.testing.assert_close(merged.result()[i], v)


BAD_OPTIONS = {
    "mad": {"units": "m"}, "distance_profile": {"units": "m"}, "prefix_mass": {"kind": "x"},
    "cls_map": {"query": "x"}, "rollout": {"head_fusion": "x"}, "token_norms": {"statistic": "x"},
    "cka": {"pool": "x"},
}


@pytest.mark.parametrize("name", ATTENTION_METRICS + HIDDEN_METRICS)
def test_every_metric_has_docs_and_options_validated(name):
    cls = pk.metrics.get(name)
    assert cls.name == name and cls.description and cls.citation
    assert "Returns" in cls.__doc__
    assert cls().label == name  # default options leave the label bare
    if name in BAD_OPTIONS:
        (opt, val), = BAD_OPTIONS[name].items()
        with pytest.raises(ConfigError, match=opt):
            cls(**BAD_OPTIONS[name])


# -- through pk.probe: a toy adapter (always) and a tiny timm ViT (when its adapter exists) ----------

class _ToyViT(nn.Module):
    """CLS + 4x4 patches of 8 px, 2 blocks of 2-head attention; enough to drive the engine."""

    def __init__(self, dim=16, heads=2, depth=2):
        super().__init__()
        self.heads, self.embed = heads, nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.tap_sink = None

    def forward(self, x):
        t = torch.cat([self.cls.expand(len(x), -1, -1), self.embed(x).flatten(2).transpose(1, 2)], 1)
        for i, lin in enumerate(self.qkv):
            b, n, d = t.shape
            q, k, v = lin(t).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            s = self.tap_sink
            if s is not None and s.wants_attention and wants(s, i):
                s.attention(i, LayerAttention(q=q, k=k, scale=q.shape[-1] ** -0.5))
            t = t + nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            if s is not None and s.wants_hidden and wants(s, i):
                s.hidden(i, t)
        return t


class _ToyAdapter(Adapter):
    name = "toy"

    @classmethod
    def from_spec(cls, name, **kw):
        return cls(_ToyViT())

    num_layers = property(lambda self: len(self.model.qkv))
    num_heads = property(lambda self: self.model.heads)

    def layout(self, pixel_values):
        return pk.TokenLayout(num_prefix=1, grid=(pixel_values.shape[-2] // 8, pixel_values.shape[-1] // 8), patch_size=8)

    def tap(self, sink):
        import contextlib

        @contextlib.contextmanager
        def _t():
            self.model.tap_sink = sink
            try:
                yield
            finally:
                self.model.tap_sink = None
        return _t()


def _check_probe(pm, x):
    names = ATTENTION_METRICS + HIDDEN_METRICS
    res = pk.probe(pm, x, metrics=names, batch_size=4, block_mb=1e-3)
    label = res.meta["model"]
    nl, nh = pm.num_layers, pm.num_heads
    scalar = {"mad": nh, "entropy": nh, "prefix_mass": nh, "nmi": nh, "head_similarity": nh, "token_norms": 1}
    counts = res.table.groupby("metric", observed=True).size()
    for name, per in scalar.items():
        assert counts[name] == len(x) * nl * per, name
    lay_ = pm.layout(x)
    assert res.arrays[f"{label}/cls_map"].shape == (len(x), nl, nh, *lay_.grid)
    assert res.arrays[f"{label}/rollout"].shape == (len(x), nl, *lay_.grid)
    assert res.arrays[f"{label}/distance_profile"].shape == (len(x), nl, nh, 21)
    cka = res.arrays[f"{label}/cka"]
    assert cka.shape == (nl, nl) and np.allclose(np.diag(cka), 1, atol=1e-5)
    # engine values equal direct computation on the model's probabilities
    probs = pm.attention(x)
    t = res.table
    for name in ("mad", "entropy", "nmi", "head_similarity"):
        m = _metric(name)
        for layer, p in probs.items():
            got = t[(t.metric == name) & (t.layer == layer)].sort_values(["image", "head"], key=lambda s: s.astype(int))["value"]
            np.testing.assert_allclose(got.to_numpy().reshape(len(x), nh), m.compute(p, lay_).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.arrays[f"{label}/rollout"][:, -1], rollout(list(probs.values()), lay_)[-1].numpy(), rtol=1e-4, atol=1e-7)
    want, _, _ = cka_between(pm, pm, x, batch_size=4)
    np.testing.assert_allclose(cka, want, rtol=1e-4, atol=1e-6)
    return res


def test_probe_with_toy_adapter():
    torch.manual_seed(0)
    pm = ProbedModel(_ToyAdapter(_ToyViT()), "toy:vit")
    x = torch.randn(8, 3, 32, 32)
    _check_probe(pm, x)


def test_cka_between_two_models_matches_u_statistic():
    torch.manual_seed(1)
    pa, pb = (ProbedModel(_ToyAdapter(_ToyViT(depth=d)), f"toy:{d}") for d in (2, 3))
    x = torch.randn(10, 3, 32, 32)  # minibatches of 4, 4 and 2: the last is skipped
    got, la, lb = cka_between(pa, pb, x, batch_size=4, estimator="minibatch")
    assert got.shape == (2, 3) and la == [0, 1] and lb == [0, 1, 2]
    ha, hb = pa.hidden_states(x), pb.hidden_states(x)
    def f(h, s):
        z = h[s, 1:].mean(1).double()
        return (z @ z.T).numpy()
    def hs(h1, h2):
        return sum(_hsic_u_statistic(f(h1, s), f(h2, s)) for s in (slice(0, 4), slice(4, 8)))
    for i, j in itertools.product(range(2), range(3)):
        want = hs(ha[i], hb[j]) / math.sqrt(hs(ha[i], ha[i]) * hs(hb[j], hb[j]))
        assert got[i, j] == pytest.approx(want, rel=1e-4)
    back, _, _ = cka_between(pb, pa, x, batch_size=4, estimator="minibatch")
    np.testing.assert_allclose(back, got.T, rtol=1e-6)
    with pytest.raises(ConfigError, match="batch_size"):
        cka_between(pa, pb, x, batch_size=2, estimator="minibatch")


def test_probe_rollout_refuses_a_subset_of_layers():
    pm = ProbedModel(_ToyAdapter(_ToyViT()), "toy:vit")
    with pytest.raises(ConfigError, match="every layer"):
        pk.probe(pm, torch.randn(4, 3, 32, 32), metrics=["rollout"], layers=[1])
    res = pk.probe(pm, torch.randn(4, 3, 32, 32), metrics=["rollout", "mad"], layers=[0])
    assert res.arrays["toy:vit/rollout"].shape == (4, 1, 4, 4)


def test_probe_with_tiny_timm_vit():
    pm = pk.load("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                 embed_dim=32, depth=2, num_heads=2)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _check_probe(pm, x)
