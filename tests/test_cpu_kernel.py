"""The CPU row kernel (probekit/engine/kernels/_cpu_rows.c): probabilities and per-row sums against plain PyTorch.

The kernel must build here (a C compiler is part of the test setup: .ci/run installs gcc); a
machine without one takes the PyTorch path, which these tests also compare against.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import probekit as pk
from probekit.engine.kernels import block_terms
from probekit.engine.kernels import cpu as cpu_kernel
from probekit.attention import LayerAttention
from probekit.engine.kernels.block_terms import layer_terms
from probekit.metric.patch_keys import patch_entropy
from probekit.engine.probe import MetricSink

pytestmark = pytest.mark.kernel

RTOL = 2e-6  # float32 rounding of another summation order (measured up to 5.2e-7)

LAYOUTS = {
    "cls, square px": pk.TokenLayout(num_prefix=1, grid=(5, 7), patch_size=(16, 16)),
    "registers, non-square px": pk.TokenLayout(num_prefix=5, grid=(4, 6), patch_size=(14, 16)),
    "no prefix": pk.TokenLayout(num_prefix=0, grid=(6, 6), patch_size=(8, 8)),
}


def test_kernel_builds_here():
    assert cpu_kernel.library() is not None, cpu_kernel.build_error()
    assert cpu_kernel.library().openmp, "built without OpenMP: rows would run on Python threads"


def _reference(z: torch.Tensor, lay: pk.TokenLayout, rows: slice) -> dict[str, torch.Tensor]:
    """The terms written out the plain way, from the whole rows ``[B, H, R, T]`` of logits."""
    n0 = lay.num_prefix
    p = torch.softmax(z.double(), -1)
    pp, zp = p[..., n0:], z.double()[..., n0:]
    q = torch.arange(rows.start, rows.stop) - n0
    c = lay.coords().double()
    diff = c[q.clamp_min(0)][:, None] - c[None]
    patch_query = (q >= 0).double()[:, None]
    grid = diff.pow(2).sum(-1).sqrt() * patch_query
    px = (diff * torch.tensor(lay.patch_size, dtype=torch.float64)).pow(2).sum(-1).sqrt() * patch_query
    return {"lse": torch.logsumexp(z.double(), -1), "mass": pp.sum(-1),
            "plog": torch.where(pp > 0, pp * zp, 0.0).sum(-1), "grid": (pp * grid).sum(-1),
            "px": (pp * px).sum(-1), "prefix": p[..., :n0], "p": p}


@pytest.mark.parametrize("unnormalized", [False, True], ids=["probs", "unnormalized"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_terms_match_plain_torch(name, unnormalized):
    lay = LAYOUTS[name]
    t, n0 = lay.num_tokens, lay.num_prefix
    g = torch.Generator().manual_seed(0)
    b, h, rows = 3, 2, slice(2, t - 1)
    z = torch.randn(b, h, t, t, generator=g) * 4
    z[..., n0 + 3] = -math.inf  # a masked patch key
    z[0, 1, :, :n0] += 30.0  # a head that parks its mass on the prefix tokens
    terms = layer_terms(b, h, t, n0, cpu_kernel.TERMS, "cpu")
    for i in range(b):  # one block per image, as the engine cuts them
        blk = z[i : i + 1, :, rows].contiguous()
        p = torch.empty_like(blk)
        inv = torch.empty(blk.shape[:-1]) if unnormalized else None
        cpu_kernel.softmax_terms(blk, p, slice(i, i + 1), rows, lay, terms, inv)
        if unnormalized:
            p = p * inv[..., None]
        # elementwise to 1e-5 of torch's float32 softmax (exp of a float32 logit ~30 below the
        # maximum is itself only good to ~2e-6); the sums below are checked to RTOL
        torch.testing.assert_close(p, torch.softmax(blk, -1), rtol=1e-5, atol=1e-10)
        assert (p[..., n0 + 3] == 0).all()
    ref = _reference(z[:, :, rows], lay, rows)
    got = {"lse": terms.lse, "mass": terms.patch_mass, "plog": terms.patch_logit, "grid": terms.dist_grid,
           "px": terms.dist_px, "prefix": terms.prefix}
    for key, want in ref.items():
        if key == "p" or (key == "prefix" and n0 == 0):
            continue
        have = got[key][:, :, rows].double()
        err = ((have - want).abs() / want.abs().clamp_min(1.0)).max().item()
        assert err < RTOL, (key, err)
    assert (terms.dist_grid[:, :, rows][:, :, : max(0, n0 - rows.start)] == 0).all()  # prefix queries: no position


def test_python_threads_split_the_rows_the_same_way(python_threads):
    lay = LAYOUTS["registers, non-square px"]
    t = lay.num_tokens
    z = torch.randn(2, 3, t, t, generator=torch.Generator().manual_seed(1)) * 3

    def run():
        terms = layer_terms(2, 3, t, lay.num_prefix, cpu_kernel.TERMS, "cpu")
        p = torch.empty_like(z)
        cpu_kernel.softmax_terms(z, p, slice(0, 2), slice(0, t), lay, terms)
        return p, terms

    p1, t1 = run()
    with python_threads():
        p2, t2 = run()
    assert torch.equal(p1, p2)
    for a, b in [(t1.lse, t2.lse), (t1.dist_px, t2.dist_px), (t1.patch_logit, t2.patch_logit), (t1.prefix, t2.prefix)]:
        assert torch.equal(a, b)


METRICS = [("mad", {}), ("mad", {"units": "patch"}), ("mad", {"units": "fraction", "renormalize": True}),
           ("entropy", {}), ("prefix_mass", {}), ("distance_profile", {})]


def _sink_values(q, k, v, lay, monkeypatch, kernel: bool):
    if not kernel:  # the PyTorch path, as on a machine without a C compiler
        monkeypatch.setattr(cpu_kernel, "library", lambda: None)
        assert block_terms.terms_served(torch.device("cpu")) == block_terms.BLOCK_TERMS
    metrics = [pk.metrics.get(n)(**kw) for n, kw in METRICS]
    sink = MetricSink(metrics, attention_pass="fused", block_mb=0.05)
    sink.start(lay)
    out = sink.attention(0, LayerAttention(q=q, k=k, v=v, scale=q.shape[-1] ** -0.5))
    monkeypatch.undo()
    return {key: vals[0] for key, vals in sink.values.items()}, out


def test_sink_values_and_output_are_the_same_on_both_paths(monkeypatch):
    lay = LAYOUTS["registers, non-square px"]
    t = lay.num_tokens
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, t, 8, generator=g) * 2 for _ in range(3))
    fast, out_fast = _sink_values(q, k, v, lay, monkeypatch, kernel=True)
    slow, out_slow = _sink_values(q, k, v, lay, monkeypatch, kernel=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert ((out_fast - sdpa).abs().max() / sdpa.abs().max()).item() < RTOL
    assert ((out_slow - sdpa).abs().max() / sdpa.abs().max()).item() < RTOL
    assert len(fast) == len(METRICS)
    for key in fast:
        assert torch.allclose(fast[key], slow[key], rtol=RTOL, atol=1e-6), key
    # and the closed form: MAD in patches of uniform attention (q = k = 0) over a 4x6 grid
    zero = torch.zeros(1, 1, t, 8)
    uni, _ = _sink_values(zero, zero, zero, lay, monkeypatch, kernel=True)
    mad = pk.metrics.get("mad")(units="patch")
    want = mad.reference_value(lay)  # the mean pairwise grid distance, times N / (N + 5 registers)
    assert abs(uni[mad.label].item() - want) < 1e-5 * want


def test_underflowed_patch_mass_falls_back_to_the_logits(monkeypatch):
    """A head that gives the CLS key everything: the patch probabilities underflow float32, the
    kernel's entropy identity cannot serve, and the layer's entropy comes from the patch logits."""
    lay = LAYOUTS["cls, square px"]
    t = lay.num_tokens
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, t, 4, generator=g)
    k = torch.randn(1, 2, t, 4, generator=g)
    bias = torch.zeros(1, 2, t, t)
    bias[:, 0, :, 0] = 200.0  # head 0: CLS logits 200 above the rest
    sink = MetricSink([pk.metrics.get("entropy")()], attention_pass="fused", block_mb=0.05)
    sink.start(lay)
    sink.attention(0, LayerAttention(q=q, k=k, v=k.clone(), scale=0.5, bias=bias))
    z = (q @ k.transpose(-1, -2)) * 0.5 + bias
    want = patch_entropy(torch.softmax(z, -1), lay, z)[:, :, lay.num_prefix :].mean(-1)
    got = sink.values["entropy"][0]
    assert torch.allclose(got, want, rtol=1e-5), (got, want)
    assert got[0, 0] > 1.0  # not the garbage of renormalized zeros


def test_cache_folder_falls_back_to_a_temporary_one_when_read_only(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBEKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert cpu_kernel._cache_dir() == tmp_path / "cache" / "cpu_kernel"
    real = cpu_kernel.os.access
    monkeypatch.setattr(cpu_kernel.os, "access",  # e.g. a read-only home
                        lambda path, mode: not str(path).startswith(str(tmp_path)) and real(path, mode))
    fallback = cpu_kernel._cache_dir()
    assert fallback.parent.parent == Path(cpu_kernel.tempfile.gettempdir())
    assert fallback.parent.name.startswith("probekit-")
