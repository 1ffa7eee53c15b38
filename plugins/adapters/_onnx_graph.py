"""Reading an exported ViT graph: its attention Softmax nodes, each block's output (the residual
stream), the patch size and the image input; and running it by onnxruntime (:class:`OnnxModule`),
a fixed-batch graph in chunks of its batch. The adapter (``onnx.py``) builds on these."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from probekit.errors import ConfigError, UnsupportedArchitectureError

__all__ = ["find_attention_softmaxes", "OnnxModule"]

_NORM_OPS = {"LayerNormalization", "ReduceMean"}  # ops that open a pre-norm block (fused or decomposed)


def _dims(value_info) -> list | None:
    """Dims of a value (int, symbol name, or None when unknown); None when the rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_attention_shape(dims: list | None) -> bool:
    """``[B, H, T, T]``: rank 4, last two dims equal (same int or same symbol)."""
    return dims is not None and len(dims) == 4 and dims[2] is not None and dims[2] == dims[3]


def _may_be_attention(dims: list | None) -> bool:
    """Rank 4 (or unknown) and not provably non-square: shape inference may have lost the link."""
    if dims is None:
        return True
    return len(dims) == 4 and not (isinstance(dims[2], int) and isinstance(dims[3], int) and dims[2] != dims[3])


def find_attention_softmaxes(model, run=None) -> tuple[list, dict[str, list | None]]:
    """The Softmax nodes over the last axis of a ``[B, H, T, T]`` tensor, in graph order.

    Args:
        model: an ``onnx.ModelProto`` (shape inference runs with data propagation, which
            resolves the head count and a shared symbol for both token axes).
        run: ``names -> {name: shape}``, one run of the graph; used when shape inference could not
            prove the two token axes of a rank-4 softmax equal (e.g. a dynamic batch gives the key
            axis a symbol of its own): the softmaxes whose run-time output is ``[B, H, T, T]`` count.

    Returns:
        ``(nodes, shapes)``: the attention Softmax nodes, and every value's dims (inferred, or
        measured by ``run``).
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {vi.name: _dims(vi) for vi in [*g.value_info, *g.input, *g.output]}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    default_axis = -1 if opset >= 13 else 1  # before opset 13 Softmax flattened from axis 1
    found, unsure = [], []
    for node in model.graph.node:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        dims = shapes.get(node.output[0])
        axis = _attr(node, "axis", default_axis)
        if axis not in (-1, 3):
            continue
        if _is_attention_shape(dims):
            found.append(node)
        elif _may_be_attention(dims):
            unsure.append(node)
    if unsure and run is not None:
        measured = run([n.output[0] for n in unsure])
        for node in unsure:
            dims = list(measured[node.output[0]])
            if _is_attention_shape(dims):
                shapes[node.output[0]] = dims
                found.append(node)
        order = {id(n): i for i, n in enumerate(model.graph.node)}
        found.sort(key=lambda n: order[id(n)])
    return found, shapes


def _residual_outputs(model, softmaxes: list) -> list[str] | None:
    """Each block's output (the second residual Add of a pre-norm block), or None.

    A residual Add adds a branch to a tensor that also feeds a norm (``x + f(norm(x))``); a
    pre-norm ViT has two per block, and block ``i``'s output is the second one after softmax
    ``i``. Returns None unless exactly two such Adds bracket every softmax.
    """
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    order, residual = {}, []
    for i, node in enumerate(model.graph.node):
        order[node.output[0] if node.output else ""] = i
        if node.op_type == "Add" and any(_NORM_OPS & consumers.get(x, set()) for x in node.input):
            residual.append((i, node.output[0]))
    soft_pos = [order[s.output[0]] for s in softmaxes]
    if len(residual) != 2 * len(softmaxes):
        return None
    for layer, pos in enumerate(soft_pos):
        prev_end = residual[2 * layer - 1][0] if layer else -1
        if not (prev_end < pos < residual[2 * layer][0] < residual[2 * layer + 1][0]):
            return None
    return [residual[2 * i + 1][1] for i in range(len(softmaxes))]


def _patch_size(model) -> tuple[int, int] | None:
    """Kernel of the first Conv whose stride equals its kernel (the patch embedding)."""
    for node in model.graph.node:
        if node.op_type == "Conv":
            k, s = _attr(node, "kernel_shape"), _attr(node, "strides")
            if k and s and list(k) == list(s) and len(k) == 2 and max(k) > 1:
                return int(k[0]), int(k[1])
    return None


def _image_input(model, input_name: str | None):
    """The graph input that takes images ``[B, C, H, W]`` (C: 1, 3, 4 or symbolic)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if input_name is not None:
        for i in inputs:
            if i.name == input_name:
                return i
        raise ConfigError(f"The graph has no input {input_name!r}; its inputs: {[i.name for i in inputs]}.")
    images = [i for i in inputs if (d := _dims(i)) is not None and len(d) == 4 and d[1] in (1, 3, 4, None)]
    if len(images) != 1:
        raise UnsupportedArchitectureError(
            f"Cannot tell which graph input takes images: inputs {[(i.name, _dims(i)) for i in inputs]}. "
            "Pass input_name=... (an input shaped [B, C, H, W])."
        )
    return images[0]


class OnnxModule(nn.Module):
    """Holds the session so that ``ProbedModel.model`` is a module; no torch parameters."""

    def __init__(self, session, input_name: str, outputs: list[str], input_dtype, batch: int | None = None):
        super().__init__()
        self.session, self.input_name, self.outputs, self.input_dtype = session, input_name, outputs, input_dtype
        self.batch = batch  # a graph exported with a fixed batch size runs exactly that many images

    def _run(self, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        feed = {self.input_name: x.detach().float().cpu().numpy().astype(self.input_dtype, copy=False)}
        return self.session.run(names, feed)

    def run(self, x: torch.Tensor, extra: Sequence[str] = ()) -> list[np.ndarray]:
        """The graph's outputs and ``extra`` values; a fixed-batch graph runs ``x`` in chunks of its
        batch, the last one padded with copies of its last image (their results dropped)."""
        names = [*self.outputs, *extra]
        n, b = x.shape[0], self.batch
        if b is None or n == b:
            return self._run(x, names)
        parts = []
        for start in range(0, n, b):
            chunk = x[start : start + b]
            if chunk.shape[0] < b:
                chunk = torch.cat([chunk, chunk[-1:].expand(b - chunk.shape[0], *chunk.shape[1:])])
            parts.append(self._run(chunk, names))
        for name, a in zip(names, parts[0], strict=True):
            if np.ndim(a) == 0 or np.shape(a)[0] != b:
                raise UnsupportedArchitectureError(
                    f"The graph runs a fixed batch of {b} and its output {name!r} {list(np.shape(a))} has no batch "
                    f"axis, so {n} images cannot be run in chunks. Use batch_size={b}, or export with a dynamic "
                    "batch axis (torch.onnx.export(..., dynamic_axes={input: {0: 'batch'}}))."
                )
        return [np.concatenate([p[i] for p in parts])[:n] for i in range(len(names))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(a)).to(x.device) for a in self.run(x)]


def _session(model, input_name: str, extra: list[str], providers=None, batch: int | None = None) -> OnnxModule:
    """The graph run by onnxruntime with the values ``extra`` added to its outputs."""
    import onnx
    import onnxruntime as ort

    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    outputs = [o.name for o in model.graph.output]
    for name in dict.fromkeys(extra):
        if name not in outputs:
            tapped.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(tapped.SerializeToString(), opts, providers=providers or ["CPUExecutionProvider"])
    elem = next(i for i in model.graph.input if i.name == input_name).type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32
    return OnnxModule(session, input_name, outputs, dtype, batch=batch)


def _shapes_at(model, input_name: str, x: torch.Tensor, names: list[str], providers=None) -> dict[str, tuple]:
    """The run-time shapes of the values ``names`` for input ``x`` (one run of a copy of the graph)."""
    out = _session(model, input_name, names, providers).run(x, names)[len(model.graph.output):]
    return {n: tuple(np.shape(a)) for n, a in zip(names, out, strict=True)}
