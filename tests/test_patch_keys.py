"""Renormalizing over patch keys from the patch-key logits: exact at any prefix (CLS) logit gap.

A head that parks almost all its mass on CLS leaves the patch-key probabilities of a softmax
over all keys to underflow float32; every metric that renormalizes over patch keys must take
the softmax of the patch-key logits instead. References are float64 values of the same metric
on the patch-only attention (which no gap can touch).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import probekit as pk
from probekit.attention import LayerAttention
from probekit.errors import LayoutError
from probekit.metric.patch_keys import patch_entropy, patch_rows
from probekit.engine.probe import MetricSink
from probekit.engine.rows import row_sum
from probekit.metric import Block

LAY = pk.TokenLayout(num_prefix=1, grid=(4, 5), patch_size=(16, 16))
NO_PREFIX = pk.TokenLayout(num_prefix=0, grid=(4, 5), patch_size=(16, 16))
GAPS = [-1000.0, -100.0, 0.0, 30.0, 95.0, 100.0, 200.0, 1000.0]  # < 0: CLS far below the patches
RENORMALIZING = [
    ("entropy", {}), ("mad", {"renormalize": True}), ("distance_profile", {"renormalize": True}),
    ("cls_map", {"query": "mean", "renormalize": True}), ("head_similarity", {"renormalize": True}),
    ("nmi", {}),
]


def _patch_logits(seed=0, b=2, h=3):
    g = torch.Generator().manual_seed(seed)
    t = LAY.num_tokens
    return 2.5 * torch.randn(b, h, t, t - 1, generator=g, dtype=torch.float64)


def _with_cls(zp: torch.Tensor, gap: float) -> torch.Tensor:
    """All-key logits: the CLS key ``gap`` above each row's largest patch logit."""
    return torch.cat([zp.amax(-1, keepdim=True) + gap, zp], -1)


def _through_engine(metric, logits: torch.Tensor) -> torch.Tensor:
    """Values of one layer as the engine computes them from a tap's q and k (here q = I, k^T = logits)."""
    t = logits.shape[-1]
    q = torch.eye(t).expand(*logits.shape[:2], t, t)
    sink = MetricSink([metric])
    sink.start(LAY)
    sink.attention(0, LayerAttention(q=q, k=logits.float().mT.contiguous()))
    return sink.finish()[metric.label][0]


@pytest.mark.parametrize("gap", GAPS)
@pytest.mark.parametrize("name, options", RENORMALIZING)
def test_renormalized_metrics_match_float64_at_any_cls_gap(name, options, gap):
    zp = _patch_logits()
    cls = pk.metrics.get(name)
    got = _through_engine(cls(**options), _with_cls(zp, gap))
    # reference: the same metric on the patch-only attention (a float64 softmax no gap can touch)
    ref = cls(**options).compute(torch.softmax(zp[:, :, 1:], -1), NO_PREFIX)
    torch.testing.assert_close(got.double(), ref.double(), rtol=2e-5, atol=2e-5)


def test_entropy_never_exceeds_ln_n_and_matches_float64_at_the_issue_gaps():
    zp = _patch_logits(seed=1, b=1, h=1)
    ref = float(patch_entropy(None, NO_PREFIX, zp[:, :, 1:]).mean())
    for gap in (95.0, 100.0, 1000.0):
        got = float(_through_engine(pk.metrics.get("entropy")(), _with_cls(zp, gap)))
        assert got == pytest.approx(ref, abs=1e-5) and got <= math.log(LAY.num_patches)


def test_entropy_from_logits_with_masked_keys_and_a_fully_masked_row():
    z = _with_cls(_patch_logits(seed=2, b=1, h=1), 50.0).float()
    z[..., 3] = -math.inf  # one masked patch key everywhere
    z[..., 5, 1:] = -math.inf  # query 5 sees only CLS: its patch row is empty (entropy 0)
    h = patch_entropy(torch.softmax(z, -1), LAY, z)
    ref = patch_entropy(None, NO_PREFIX, torch.cat([z[..., 1:3], z[..., 4:]], -1).double())
    ref[..., 5] = 0
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5)
    assert (patch_rows(torch.softmax(z, -1), LAY, z)[..., 5, :] == 0).all()


def test_probabilities_only_fallback_is_exact_while_the_patch_mass_is_normal():
    # what a tap without logits (ONNX) gets: p / sum(p); fine at moderate gaps, documented beyond
    zp = _patch_logits(seed=3, b=1, h=1)
    probs = torch.softmax(_with_cls(zp, 30.0), -1).float()
    torch.testing.assert_close(patch_rows(probs, LAY).double(), torch.softmax(zp, -1), rtol=1e-4, atol=1e-9)


def test_cls_index_lives_on_the_token_layout():
    assert LAY.cls_index() == 0
    dist = pk.TokenLayout(num_prefix=2, grid=(2, 2), patch_size=(8, 8), prefix_kinds=("dist", "cls"))
    assert dist.cls_index() == 1
    with pytest.raises(LayoutError, match=r"Metric 'mad' was asked for CLS queries, but this model has no CLS"):
        pk.metrics.get("mad")(queries="cls").compute(torch.full((1, 1, 20, 20), 0.05), NO_PREFIX)


def _terms_at(gap: float):
    """The fused kernel's per-row sums, computed here in float32 from the all-key logits."""
    from probekit.metric.terms import RowTerms

    zp = _patch_logits(seed=4, b=1, h=2)
    z = _with_cls(zp, gap).float()
    p = torch.softmax(z, -1)
    n0 = LAY.num_prefix
    return z, p, RowTerms(lse=torch.logsumexp(z, -1), patch_mass=p[..., n0:].sum(-1),
                          patch_logit=torch.linalg.vecdot(p[..., n0:], z[..., n0:]))


@pytest.mark.parametrize("gap", [0.0, 20.0, 95.0, 1000.0])
def test_kernel_sums_are_used_only_where_the_patch_mass_survived(gap):
    # the kernel hands over sums of probabilities over all keys: past the float32 underflow they
    # cannot renormalize, so entropy and renormalized MAD defer to the blocked path (None)
    z, p, terms = _terms_at(gap)
    rows = slice(LAY.num_prefix, LAY.num_tokens)
    ent = pk.metrics.get("entropy")()
    got = row_sum(ent, Block(rows=rows, layout=LAY, terms=terms.rows(rows)))
    if gap > 30:
        assert got is None
        mad_terms = replace(terms, dist_px=p[..., 1:].sum(-1)).rows(rows)
        assert pk.metrics.get("mad")(renormalize=True).row_values(Block(rows=rows, layout=LAY, terms=mad_terms)) is None
    else:
        want = row_sum(ent, Block(rows=rows, layout=LAY, probs=p[:, :, rows], logits=z[:, :, rows]))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("gap", [0.0, 95.0, 1000.0])
@pytest.mark.parametrize("name, options", [
    ("entropy", {}), ("mad", {"renormalize": True}), ("distance_profile", {"renormalize": True}),
    ("cls_map", {"query": "mean", "renormalize": True}),
])
def test_windowed_path_renormalizes_from_logits_too(name, options, gap):
    # the grouped (windowed/pooled) path renormalizes over the patch keys each query sees: on a
    # global layer it must match the same float64 reference at any CLS gap
    from probekit.geometry import LayerGeometry
    from probekit.engine.grouped import reduce_groups

    zp = _patch_logits(seed=5)
    z = _with_cls(zp, gap).float()
    t = z.shape[-1]
    attn = LayerAttention(q=torch.eye(t).expand(*z.shape[:2], t, t), k=z.mT.contiguous())
    m = pk.metrics.get(name)(**options)
    got = reduce_groups([m], attn, LayerGeometry.from_layout(LAY), 2**20)[m.label]
    ref = pk.metrics.get(name)(**options).compute(torch.softmax(zp[:, :, 1:], -1), NO_PREFIX)
    torch.testing.assert_close(got.double(), ref.double(), rtol=2e-5, atol=2e-5)
