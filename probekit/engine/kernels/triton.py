"""The fused GPU kernel (Triton): one pass over key blocks gives a layer's attention output
and the per-query-row sums the row-wise metrics read, never writing ``[T, T]``.

Why: on a GPU the model's own attention is a flash kernel that never materializes the
probabilities; recomputing them in blocks for the metrics costs more than the forward. This
kernel runs flash attention's online softmax (running row maximum ``m``, normalizer ``l``, all
running sums rescaled by ``exp(m_old - m_new)`` when the maximum grows) and, next to the
output ``sum_j p_ij v_j``, keeps per query row:

- ``lse``: ``log Z`` over all keys;
- ``patch_mass``: ``sum_{j patch} p_ij``; ``patch_logit``: ``sum_{j patch} p_ij s_ij`` (entropy
  over patch keys is ``lse + ln mass - patch_logit / mass``);
- ``dist_px`` / ``dist_grid``: ``sum_{j patch} p_ij d(i, j)``, the distance computed from the
  token indices and the grid on the fly (pixels, grid steps);
- ``prefix``: the mass on each prefix token;
- ``hist``: the patch mass per distance bin (squared distances against squared bin edges).

The per-row terms are ``[B, H, T]`` (``[B, H, T, k]``): metrics sum them over their query rows on
the device (``block.terms`` of :meth:`probekit.metric.Metric.row_values`). Which metrics the kernel serves is
declared by each metric (``Metric.kernel_terms``); the others take the blocked PyTorch path in
the same run. Correctness is tested on CPU under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import math

import torch

from probekit.metric.terms import TERMS, RowTerms
from probekit.tokens import TokenLayout

__all__ = ["available", "RowTerms", "attention_rows", "run_layer", "wanted", "TERMS"]



@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from probekit.engine.kernels._triton_rows import rows_kernel

    return rows_kernel


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: Triton importable, and a CUDA device or the interpreter."""
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton() is not None


def wanted(attn, mode: str) -> bool:
    """Whether the engine runs this layer through the kernel: only when asked for (``"kernel"``).

    Not chosen by ``"auto"`` yet: the kernel is checked against the PyTorch path under Triton's
    interpreter, but its speed on a GPU is not measured here (benchmarks/bench_gpu.py does).
    """
    if attn.probs_given is not None or mode != "kernel":
        return False
    if not available(attn.device):
        from probekit.errors import ConfigError

        raise ConfigError("attention_pass='kernel' needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU, "
                          "slow: for tests). Use attention_pass='auto' or 'fused'.")
    return True


def run_layer(attn, layout: TokenLayout, metrics: list, output: bool) -> RowTerms:
    """One kernel pass over a layer: the per-row terms ``metrics`` declare (``kernel_terms``).

    ``attn``: the layer's :class:`~probekit.engine.blocks.LayerBlocks`. With ``output``, also fills its
    ``output``. The first distance-profile metric chooses the
    histogram's bins (``kernel_histogram``); a metric with other bins reads ``terms.hist_spec``
    and answers None, and the engine takes the blocked path for it.
    """
    want = set().union(*(m.kernel_terms for m in metrics)) if metrics else set()
    hist = next((m.kernel_histogram(layout) for m in metrics if "hist" in m.kernel_terms), None)
    if output:
        attn.start_output()
    rec = attn.attn
    return attention_rows(rec.q, rec.k, rec.v if output else None, rec.scale, rec.bias, layout,
                          want=want, hist=hist, out=attn.output)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def attention_rows(q, k, v, scale: float, bias, layout: TokenLayout, *, want: set[str],
                   hist: tuple[tuple[float, float], tuple[float, ...]] | None = None,
                   out: torch.Tensor | None = None, block: tuple[int, int] | None = None) -> RowTerms:
    """Run the kernel on one layer.

    Args:
        q: ``[B, H, T, d]``; k, v: ``[B, Hk, T, d]`` / ``[B, Hk, T, dv]`` (``H`` a multiple of
            ``Hk``: grouped queries share k/v heads without copies); v may be None (no output).
        bias: additive, broadcastable to ``[B, H, T, T]`` (relative-position table, mask), or None.
        want: terms from :data:`TERMS` (``lse`` and ``patch_mass`` always come).
        hist: ``((step_y, step_x), squared left edges)`` of the distance histogram, the distance
            being ``sqrt((dy step_y)^2 + (dx step_x)^2)`` in grid steps ``dy, dx``.
        out: ``[B, H, T, dv]`` tensor (any strides) the attention output is written to.
        block: ``(BLOCK_M, BLOCK_N)`` (default 64, 64; 16, 16 under the interpreter).
    """
    kernel = _triton()
    if kernel is None:
        raise RuntimeError("The fused attention kernel needs triton (pip install triton).")
    import os

    b, h, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    if h % hk:
        raise ValueError(f"{h} query heads do not share {hk} key/value heads evenly.")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    bm, bn = block or ((16, 16) if interp else (64, 64))
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    lse, mass = torch.empty(b, h, t, **f32), torch.empty(b, h, t, **f32)
    plog = torch.empty(b, h, t, **f32) if "patch_logit" in want else lse
    want_dist = "dist" in want
    dpx = torch.empty(b, h, t, **f32) if want_dist else lse
    dgr = torch.empty(b, h, t, **f32) if want_dist else lse
    n0 = layout.num_prefix
    want_pre = "prefix" in want and n0 > 0
    pre = torch.empty(b, h, t, n0, **f32) if want_pre else lse
    if hist is not None:
        (hy, hx), edges2 = hist
        nbins = len(edges2)
        e2 = torch.full((_pow2(nbins),), float("inf"), **f32)
        e2[:nbins] = torch.tensor(edges2, dtype=torch.float32)
        hst = torch.empty(b, h, t, nbins, **f32)
    else:
        hy = hx = 1.0
        nbins, e2, hst = 1, lse, lse
    want_out = v is not None and out is not None
    if bias is not None:
        bias = bias.expand(b, h, t, s)
        sb = bias.stride()
    else:
        sb = (0, 0, 0, 0)
    vv, oo = (v, out) if v is not None and out is not None else (k, q)  # (want_out spelled out for mypy)
    grid = (triton_cdiv(t, bm), b * h)
    kernel[grid](q, k, vv, bias if bias is not None else q, oo, lse, mass, plog, dpx, dgr, pre, hst, e2,
                 *q.stride(), *k.stride(), *vv.stride(), *sb, *oo.stride(),
                 h, t, s, d, vv.shape[-1], h // hk, float(scale), n0, layout.grid[1],
                 float(layout.patch_size[0]), float(layout.patch_size[1]), float(hy), float(hx), nbins,
                 BLOCK_M=bm, BLOCK_N=bn, BD=_pow2(d, 16), BDV=_pow2(vv.shape[-1], 16),
                 HAS_BIAS=bias is not None, WANT_OUT=want_out, WANT_PLOG="patch_logit" in want,
                 WANT_DIST=want_dist, WANT_PRE=want_pre, NP=_pow2(n0), WANT_HIST=hist is not None,
                 NB=_pow2(nbins), IEEE=q.dtype == torch.float32)
    return RowTerms(lse=lse, patch_mass=mass, patch_logit=plog if "patch_logit" in want else None,
                    dist_px=dpx if want_dist else None, dist_grid=dgr if want_dist else None,
                    prefix=pre if want_pre else None, hist=hst if hist is not None else None, hist_spec=hist)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
