"""Helpers shared by test files (imported by conftest.py as ``probekit_tests_helpers``).

Tiny models exported to ONNX: the ONNX adapter's parity tests and the conformance kit's
adapter tests both need a graph whose Softmax nodes are the attention. Closed forms of the
geometry tests (plain-Python distances; a layer's value through the engine's grouped path).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from probekit.testing import randomize_parameters


def export_onnx(module: torch.nn.Module, x: torch.Tensor, path, dynamic_size: bool = False,
                dynamic_batch: bool = True):
    """Legacy TorchScript exporter (the dynamo one needs onnxscript), opset 17; returns ``path``.

    The batch axis is dynamic unless ``dynamic_batch=False`` (then fixed at ``x``'s batch);
    ``dynamic_size`` makes height and width dynamic too.
    """
    dims = ({0: "batch"} if dynamic_batch else {}) | ({2: "height", 3: "width"} if dynamic_size else {})
    axes = {"pixel_values": dims} if dims else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["out"], dynamic_axes=axes)
    return path


class LastHidden(torch.nn.Module):
    """A transformers encoder that returns ``last_hidden_state`` alone (one ONNX output)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).last_hidden_state


def tiny_dinov2(image_size: int = 28, layers: int = 2, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """A tiny randomized transformers DINOv2 (eager attention; hidden 32, 2 heads, 7 px patches)."""
    import transformers as tr
    cfg = tr.Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                          image_size=image_size, patch_size=7, attn_implementation="eager")
    torch.manual_seed(seed)  # the init draws from the global generator: make it independent of test order
    return randomize_parameters(tr.Dinov2Model(cfg).eval(), seed=seed, scale=scale)


# -- closed forms of windowed and pooled layers ------------------------------------------------------
def mean_pair_distance(cells_a, cells_b, p: float) -> float:
    """Plain-Python mean Euclidean distance (px) between every cell of ``a`` and every cell of ``b``."""
    return sum(p * math.dist(a, b) for a in cells_a for b in cells_b) / (len(cells_a) * len(cells_b))


def block(h, w):
    """The cells ``(row, col)`` of an ``h x w`` block, row-major."""
    return list(itertools.product(range(h), range(w)))


def layer_value(metric, geo, probs: torch.Tensor) -> torch.Tensor:
    """[B, H] (or [B, H, ...]) of ``metric`` on one grouped layer, through the engine's grouped path."""
    from probekit.attention import LayerAttention
    from probekit.engine.grouped import reduce_groups
    from probekit.engine.probe import build_metrics

    m = build_metrics([metric])[0]
    return reduce_groups([m], LayerAttention(probs_given=probs), geo, 2**16)[m.label]


def window_sums(metric, geo, probs: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Each group's ``metric`` values summed over its queries (those of the metric's ``query_tokens``),
    ``[G, H, ...]``: what the engine's grouped path adds up per image, for the ``G`` groups of one image."""
    from probekit.engine.rows import row_sum
    from probekit.metric import Block

    groups = torch.arange(geo.groups)
    weight = geo.query_mask(metric.query_tokens).to(probs.dtype)
    return row_sum(metric, Block(rows=slice(0, geo.num_queries), probs=probs, logits=logits, geometry=geo,
                                 groups=groups, query_weight=weight))


def uniform(geo, batch: int = 2) -> torch.Tensor:
    """Uniform attention over each query's visible keys, for ``batch`` images."""
    return geo.uniform().repeat(batch, 1, 1, 1)
