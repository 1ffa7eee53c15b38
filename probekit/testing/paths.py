"""Every engine path a row-wise metric's value can take, checked against the plain-probability path.

The engine computes a layer's values along several paths (:mod:`probekit.engine.sink`): blocks of
q·kᵀ and their softmax, one attention pass that also makes the layer's output, per-row sums made
next to the softmax by PyTorch or by the C row kernel, the fused Triton kernel, and windowed,
pooled and class-attention layers group by group. A metric's :meth:`~probekit.Metric.row_values`
reads whatever the path has, so each path is a place where its number can go wrong (a wrong
kernel term, a query count taken from the wrong rows). Here each path runs on seeded q, k and v
through the engine's own sink and must equal the plain path: :meth:`~probekit.Metric.compute` on
``softmax(q·kᵀ·scale + bias)`` made in float64, or, for grouped layers, the metric's per-row values
of the whole layer at once, summed over each image's queries in plain code. A path that cannot
run here (no C compiler, no triton) is a failure that says what to install, never a skip.

The Triton kernel runs under its interpreter in a child process (``TRITON_INTERPRET=1`` must be set
before triton is imported), which imports the metric's class by name: define plugin metrics at
module level of an importable module. On a machine with CUDA it runs in this process on the GPU.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

import torch

from probekit.attention import LayerAttention
from probekit.engine.kernels import cpu as cpu_kernel
from probekit.engine.sink import MetricSink
from probekit.geometry import LayerGeometry, ModelGeometry
from probekit.metric import Block, Metric
from probekit.metric.base import requirements
from probekit.tokens import TokenLayout

__all__ = ["check_engine_paths", "check_grouped_paths", "GLOBAL_PATHS"]

_LAYOUT = TokenLayout(num_prefix=1, grid=(3, 4), patch_size=(8, 8))  # non-square on purpose
_B, _H, _D = 3, 2, 8

#: the global-layer paths: what the tap hands over and the sink's choices
GLOBAL_PATHS: dict[str, dict[str, Any]] = {
    "probabilities handed over (one query row per block)": dict(tap="probs", block_mb=1e-9),
    "q·kᵀ in blocks, separate pass, no row terms (one query row per block)":
        dict(tap="qk", attention_pass="separate", row_terms="none", block_mb=1e-9),
    "one attention pass (P·V from the metrics' blocks), no row terms": dict(tap="qkv", attention_pass="fused",
                                                                          row_terms="none"),
    "PyTorch's per-row sums next to the softmax": dict(tap="qk", attention_pass="separate", row_terms="torch"),
    "the C row kernel's per-row sums (one attention pass)": dict(tap="qkv", attention_pass="fused", row_terms="auto"),
    "the C kernel's whole attention pass (no bias: layers on CPU)":
        dict(tap="qkv", attention_pass="fused", row_terms="auto", bias=False),
    "the Triton kernel's per-row sums": dict(tap="qkv", attention_pass="kernel", row_terms="auto"),
}


def _clone(metric: Metric) -> Metric:
    return type(metric)(**metric.options())


def _qkv(items: int, tq: int, tk: int, seed: int, device="cpu") -> dict[str, Any]:
    """Seeded q, k, v, an additive bias (a relative-position table) and the scale of one layer."""
    g = torch.Generator().manual_seed(seed)
    q, k = 2 * torch.randn(items, _H, tq, _D, generator=g), 2 * torch.randn(items, _H, tk, _D, generator=g)
    v = torch.randn(items, _H, tk, _D, generator=g)
    bias = 0.5 * torch.randn(1, _H, tq, tk, generator=g)
    return {"q": q.to(device), "k": k.to(device), "v": v.to(device), "bias": bias.to(device), "scale": _D**-0.5}


def _plain_probs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, logits)`` of a case, made in float64 and rounded to float32 once."""
    z = case["q"].double() @ case["k"].double().transpose(-1, -2) * case["scale"]
    if case["bias"] is not None:
        z = z + case["bias"].double()
    return torch.softmax(z, -1).float(), z.float()


def _engine(metric: Metric, case: dict[str, Any], layout: TokenLayout, geometry: ModelGeometry | None = None,
            tap: str = "qk", bias: bool = True, **sink_kw) -> torch.Tensor:
    """One layer through the engine's sink, as a forward pass would report it: per-image values."""
    if not bias:
        case = {**case, "bias": None}
    sink = MetricSink([metric], **sink_kw)
    sink.start(layout, geometry)
    if tap == "probs":
        attn = LayerAttention(probs_given=_plain_probs(case)[0])
    else:
        attn = LayerAttention(q=case["q"], k=case["k"], scale=case["scale"], bias=case["bias"],
                              v=case["v"] if tap == "qkv" else None)
    sink.attention(0, attn)
    return sink.finish()[metric.label][0]


def _disagreement(engine: torch.Tensor, plain: torch.Tensor) -> str | None:
    """Why two per-image value tensors differ beyond float32 rounding, or None."""
    if engine.shape != plain.shape:
        return f"shape {tuple(engine.shape)} != {tuple(plain.shape)}"
    e, p = engine.double().cpu(), plain.double().cpu()
    both_nan = torch.isnan(e) & torch.isnan(p)
    dev = (e - p).abs().masked_fill(both_nan, 0)
    tol = 1e-5 + 1e-4 * float(p.abs().masked_fill(torch.isnan(p), 0).max())
    worst = float(dev.max()) if dev.numel() else 0.0
    if worst != worst or worst > tol:  # NaN on one side counts as a difference
        return f"differs by {worst:.4g} (tolerance {tol:.2g})"
    return None


def _path_available(path: str, metric: Metric) -> str | None:
    """Why ``path`` cannot run here (a failure: the kit never skips a path), or None."""
    if "C row kernel" in path and cpu_kernel.library() is None:
        return (f"the C row kernel did not build here ({cpu_kernel.build_error()}); install a C compiler "
                "(gcc or clang) so this path can be checked")
    if "Triton" in path:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed; pip install triton so the fused kernel's path can be checked"
    return None


def check_engine_paths(name: str, metric: Metric) -> None:
    # Every global-layer path (blocks, one pass, PyTorch's and the C kernel's row sums, the Triton
    # kernel) must give the plain path's values: a fast form that reads the wrong kernel term
    # would otherwise pass every other check and be wrong on every real model.
    case = _qkv(_B, _LAYOUT.num_tokens, _LAYOUT.num_tokens, seed=11)
    plains = {bias: _clone(metric).compute(_plain_probs(case if bias else {**case, "bias": None})[0], _LAYOUT).float()
              for bias in (True, False)}
    problems = []
    for path, how in GLOBAL_PATHS.items():
        plain = plains[how.get("bias", True)]
        if "kernel" in path and not metric.kernel_terms:
            continue  # the kernels' sums are offered only to metrics that declare kernel_terms
        why = _path_available(path, metric)
        if why is None:
            try:
                got = _triton_values(metric) if "Triton" in path else _engine(_clone(metric), case, _LAYOUT, **how)
                why = _disagreement(got, plain)
            except Exception as exc:  # a path that raises disagrees too: say which one
                why = f"raised {type(exc).__name__}: {exc}"
        if why:
            problems.append(f"{path}: {why}")
    assert not problems, (
        f"{name}: engine path(s) disagree with the plain-probability path (compute on softmax(q·kᵀ)): "
        + "; ".join(problems))


def _grouped_cases(metric: Metric) -> dict[str, tuple[TokenLayout, LayerGeometry]]:
    """The grouped layers whose geometry meets ``metric``'s requirements."""
    win = TokenLayout(num_prefix=0, grid=(3, 4), patch_size=(8, 8))
    cases = {
        "windowed layer (shifted 2x2 windows, padded)": (win, LayerGeometry.windows((3, 4), (8, 8), (2, 2),
                                                                                   shift=(1, 1))),
        "pooled-key layer (4x4 queries, 2x2 pooled keys, CLS)": (
            TokenLayout(num_prefix=1, grid=(4, 4), patch_size=(8, 8)),
            LayerGeometry.pooled((4, 4), (8, 8), (2, 2), (16, 16), prefix_kinds=("cls",))),
        "class-attention layer (the CLS query only)": (_LAYOUT, LayerGeometry.class_attention(_LAYOUT)),
    }
    return {k: (lay, geo) for k, (lay, geo) in cases.items()
            if not any(geo.lacks(r) for r in ("tokens", *requirements(metric)))}


def _plain_grouped(metric: Metric, probs: torch.Tensor, geo: LayerGeometry) -> torch.Tensor:
    """Per-image values of a grouped layer in plain code: the whole layer's per-row values at once,
    the metric's query rows of each image summed and divided by their count."""
    n, _, tq, _ = probs.shape
    groups = torch.arange(n) % geo.groups
    weight = geo.query_mask(metric.query_tokens).float()[groups]
    v = metric.row_values(Block(rows=slice(0, tq), probs=probs, geometry=geo, groups=groups, query_weight=weight))
    assert v is not None, "row_values returned None for a block with probabilities"
    axis = 2 if metric.per_head else 1
    if v.shape[axis] != 1 or tq == 1:  # a row axis of 1 holds the rows' weighted sum already
        v = v * weight.view(n, *([1] * (axis - 1)), tq, *([1] * (v.dim() - axis - 1)))
    per_group = v.sum(axis)
    per_image = per_group.view(n // geo.groups, geo.groups, *per_group.shape[1:]).sum(1)
    return per_image / geo.queries_per_image(metric.query_tokens)


def check_grouped_paths(name: str, metric: Metric) -> None:
    # Windowed, pooled and class-attention layers reach metrics whose requires admit them; the engine
    # reduces them a few groups at a time with the logits at hand, and must give the plain values.
    # A CLS-query metric on a class-attention layer must also give what it gives on a global layer
    # whose CLS row is the same attention: the query count and the rows are the engine's, not guesses.
    problems = []
    for what, (layout, geo) in _grouped_cases(metric).items():
        case = _qkv(_B * geo.groups, geo.num_queries, geo.num_keys, seed=13)
        probs = _plain_probs(case)[0]
        geometry = ModelGeometry(layout, {0: geo}, num_layers=1)
        try:
            plain = _plain_grouped(_clone(metric), probs, geo)
            why = _disagreement(_engine(_clone(metric), case, layout, geometry, block_mb=1e-9), plain)
            if why is None and geo.kind == "class" and metric.query_tokens == "cls":
                full = torch.softmax(torch.randn(_B, _H, layout.num_tokens, layout.num_tokens,
                                                 generator=torch.Generator().manual_seed(3)), -1)
                full[:, :, layout.cls_index()] = probs[:, :, 0]
                why = _disagreement(plain, _clone(metric).compute(full, layout))
                why = why and f"disagrees with a global layer whose CLS row is the same attention: {why}"
        except Exception as exc:
            why = f"raised {type(exc).__name__}: {exc}"
        if why:
            problems.append(f"{what}: {why}")
    assert not problems, f"{name}: grouped-layer path(s) disagree with the plain path: " + "; ".join(problems)


# -- the Triton kernel, under its interpreter in a child process (or on CUDA here) -----------------

def _triton_values(metric: Metric) -> torch.Tensor:
    """The Triton path's per-image values of the global case (in a child process on CPU)."""
    if torch.cuda.is_available():
        case = _qkv(_B, _LAYOUT.num_tokens, _LAYOUT.num_tokens, seed=11, device="cuda")
        return _engine(_clone(metric), case, _LAYOUT, **GLOBAL_PATHS["the Triton kernel's per-row sums"]).cpu()
    cls = type(metric)
    target = f"{cls.__module__}:{cls.__qualname__}"
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise RuntimeError(f"the Triton path runs in a child process, which must import {target}: define the "
                           "metric at module level of an importable module")
    return torch.tensor(_child_values(target, json.dumps(metric.options(), sort_keys=True), _source_stamp(cls)))


def _source_stamp(cls: type) -> str:
    """The metric's source file and its modification time: a cached child result follows edits."""
    import inspect

    try:
        path = inspect.getsourcefile(cls) or ""
        return f"{path}:{os.stat(path).st_mtime_ns}"
    except (TypeError, OSError):
        return ""


@functools.lru_cache(maxsize=64)
def _child_values(target: str, options: str, stamp: str) -> list:
    """The child's values for one metric class and options (once per process: each child starts torch)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-m", "probekit.testing._triton_child", target, options],
                         env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the child process under Triton's interpreter failed: {out.stderr.strip()[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
