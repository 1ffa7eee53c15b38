"""Refusals before the forward pass: a model, or a layer, that lacks what a metric needs.

A metric declares what it needs (``needs``, ``requires``, ``query_tokens``); these functions read
the declarations and say, with the reason and what to do, why a model or a layer cannot be probed
with it. Nothing here computes a value.
"""

from __future__ import annotations

from probekit.errors import UnsupportedArchitectureError
from probekit.geometry import REQUIREMENTS, ModelGeometry, layout_lacks
from probekit.metric import Metric
from probekit.metric.base import requirements
from probekit.tokens import TokenLayout

__all__ = ["refuse_model", "refuse_layers"]


def refuse_model(metric: Metric, adapter) -> None:
    """Refuse a model (an :class:`~probekit.adapter.Adapter`) ``metric`` cannot describe at all.

    Layer by layer, :func:`refuse_layers` decides; this only refuses an adapter that is not global
    and gives no per-layer geometry to say which layers a metric could still read.
    """
    from probekit.adapter import Adapter

    no_geometry = type(adapter).geometry is Adapter.geometry
    if metric.needs == "attention" and "global" in requirements(metric) and not adapter.global_attention \
            and no_geometry:
        raise UnsupportedArchitectureError(
            f"Metric {metric.name!r} needs global attention (every query sees every patch); this "
            "model attends within local windows, where the metric has no meaning. Use it on "
            "global-attention ViTs only."
        )
    if metric.needs == "hidden" and not adapter.provides_hidden:
        raise UnsupportedArchitectureError(
            f"Metric {metric.name!r} needs each block's output tokens, which the {adapter.name!r} "
            "adapter cannot tap."
        )


def refuse_layers(metric: Metric, geometry: ModelGeometry, layers=None) -> None:
    """Refuse (before any computation) a model whose layers lack what ``metric`` needs.

    Args:
        geometry: a :class:`~probekit.geometry.ModelGeometry` for the input about to run.
        layers: the layer indices that will be probed (None: all).
    """
    if metric.needs != "attention":
        if "cls" in requirements(metric):  # hidden metrics: a model whose input has no class token
            _refuse(metric, geometry.layout, "cls", "this model's input")
        return
    for i in range(geometry.num_layers) if layers is None else sorted(layers):
        for req in ("tokens", *requirements(metric)):
            _refuse(metric, geometry.layer(i), req, f"layer {i} of this model")


def _refuse(metric: Metric, g, req: str, where: str) -> None:
    why = layout_lacks(g, req) if isinstance(g, TokenLayout) else g.lacks(req)
    if why:
        raise UnsupportedArchitectureError(
            f"Metric {metric.label!r} needs {REQUIREMENTS[req]}, but {where} {why}. "
            "Probe other layers (layers=[...]) or use a metric whose requirements this layer "
            "meets (`probekit metrics` lists them)."
        )
