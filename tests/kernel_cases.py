"""The fused Triton kernel against the PyTorch path, on CPU under Triton's interpreter.

Run by tests/test_kernel.py in a child process with ``TRITON_INTERPRET=1``: the variable must be
set before anything imports triton (torch may import it early), so it cannot be set for one file
inside the main test process without changing triton for every other test. Shapes are tiny:
the interpreter runs each program in NumPy.
"""

from __future__ import annotations

import os

import pytest
import torch

import probekit as pk
from probekit.engine.kernels import triton as kernel
from probekit.attention import LayerAttention
from probekit.engine.probe import MetricSink, build_metrics

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("Run tests/kernel_cases.py with TRITON_INTERPRET=1 (tests/test_kernel.py does).")

TOL = dict(rtol=1e-5, atol=1e-5)


def _case(b=2, h=2, n0=1, grid=(3, 5), d=8, hk=None, bias=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = n0 + grid[0] * grid[1]
    hk = hk or h
    q = torch.randn(b, h, t, d, generator=g) * 1.5
    k = torch.randn(b, hk, t, d, generator=g) * 1.5
    v = torch.randn(b, hk, t, d, generator=g)
    lay = pk.TokenLayout(num_prefix=n0, grid=grid, patch_size=(16, 12), prefix_kinds=("cls", "reg", "reg")[:n0])
    if bias == "table":
        bias = torch.randn(1, h, t, t, generator=g)
    elif bias == "mask":
        keep = torch.rand(b, 1, 1, t, generator=g) > 0.3
        keep[..., n0] = True
        bias = torch.zeros(b, 1, 1, t).masked_fill(~keep, float("-inf"))
    return q, k, v, bias, lay


def _reference(q, k, v, scale, bias):
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    z = q @ k.transpose(-1, -2) * scale + (0 if bias is None else bias)
    p = torch.softmax(z, -1)
    return z, p, p @ v


@pytest.mark.parametrize("shape", [
    dict(), dict(n0=0, grid=(4, 4)), dict(n0=3, grid=(2, 7), bias="table"), dict(hk=1, h=4, bias="mask"),
], ids=["cls-3x5", "no-prefix-4x4", "regs-2x7-biased", "grouped-masked"])
def test_kernel_terms_equal_the_torch_rows(shape):
    q, k, v, bias, lay = _case(**shape)
    scale = 0.4
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
    edges = [0.0, 16.0, 20.0, 40.0]
    terms = kernel.attention_rows(q, k, v, scale, bias, lay, out=out,
                                  want={"patch_logit", "dist", "prefix"}, hist=((16.0, 12.0), [e * e for e in edges]))
    z, p, o = _reference(q, k, v, scale, bias)
    torch.testing.assert_close(out, o, **TOL)
    n0 = lay.num_prefix
    pp = p[..., n0:]
    torch.testing.assert_close(terms.lse, torch.logsumexp(z, -1), **TOL)
    torch.testing.assert_close(terms.patch_mass, pp.sum(-1), **TOL)
    zz = torch.where(pp > 0, z[..., n0:], torch.zeros(()))
    torch.testing.assert_close(terms.patch_logit, (pp * zz).sum(-1), **TOL)
    dpx = torch.zeros(lay.num_tokens, lay.num_patches)
    dpx[n0:] = lay.pixel_distances()
    torch.testing.assert_close(terms.dist_px, (pp * dpx).sum(-1), **TOL)
    dgr = torch.zeros(lay.num_tokens, lay.num_patches)
    dgr[n0:] = lay.grid_distances()
    torch.testing.assert_close(terms.dist_grid, (pp * dgr).sum(-1), **TOL)
    if n0:
        torch.testing.assert_close(terms.prefix, p[..., :n0], **TOL)
    idx = torch.bucketize(lay.pixel_distances(), torch.tensor(edges[1:]), right=True)  # [N, N]
    ref_hist = torch.einsum("bhrn,rnk->bhrk", pp[:, :, n0:], torch.nn.functional.one_hot(idx, len(edges)).float())
    torch.testing.assert_close(terms.hist[:, :, n0:], ref_hist, **TOL)


METRICS = ["mad", {"mad": {"units": "patch", "renormalize": True}}, {"mad": {"units": "fraction"}},
           "entropy", {"entropy": {"normalized": True}}, "prefix_mass", {"prefix_mass": {"kind": "reg"}},
           {"distance_profile": {"units": "patch"}}, {"distance_profile": {"renormalize": True}}]


@pytest.mark.parametrize("shape", [dict(n0=3, grid=(2, 7), bias="table"), dict(hk=1, h=4, bias="mask", grid=(4, 3))],
                         ids=["regs-2x7-biased", "grouped-masked-4x3"])
def test_sink_kernel_path_equals_the_blocked_path(shape):
    q, k, v, bias, lay = _case(**shape)
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    vr = v.repeat_interleave(q.shape[1] // v.shape[1], 1)

    def run(mode):
        sink = MetricSink(build_metrics(METRICS + ["head_similarity"]), attention_pass=mode)
        sink.start(lay)
        out = sink.attention(0, LayerAttention(q=q, k=kr, v=vr, scale=0.3, bias=bias))
        return out, sink.finish(), sink

    out, values, sink = run("kernel")
    ref_out, ref, _ = run("fused")
    # head_similarity is not row-wise; the second profile's bins differ from the first's
    fallback = {"head_similarity", "distance_profile[renormalize=True]"}
    assert sink.kernel_served == set(values) - fallback
    torch.testing.assert_close(out, ref_out, **TOL)
    for label in ref:
        torch.testing.assert_close(values[label][0], ref[label][0], **TOL, msg=label)


def test_kernel_pass_through_a_model_matches_the_untapped_model():
    pm = pk.load("timm:vit_small_patch14_reg4_dinov2", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                 patch_size=8, img_size=(24, 40))
    x = torch.randn(1, 3, 24, 40)
    with torch.inference_mode():
        plain = pm.model(x)
    res = pk.probe(pm, x, metrics=["mad", "entropy"], attention_pass="kernel").table
    ref = pk.probe(pm, x, metrics=["mad", "entropy"], attention_pass="separate").table
    torch.testing.assert_close(torch.tensor(res.value.to_numpy()), torch.tensor(ref.value.to_numpy()), **TOL)
    sink = MetricSink(build_metrics(["mad"]), attention_pass="kernel")
    with torch.inference_mode(), pm.adapter.tap(sink):
        sink.start(pm.layout(x))
        fused = pm.model(x)
    assert sink.kernel_served == {"mad"}
    torch.testing.assert_close(fused, plain, **TOL)
