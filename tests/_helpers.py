"""Helpers shared by test files (imported by conftest.py as ``probekit_tests_helpers``).

Tiny models exported to ONNX: the ONNX adapter's parity tests and the conformance kit's
adapter tests both need a graph whose Softmax nodes are the attention.
"""

from __future__ import annotations

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
