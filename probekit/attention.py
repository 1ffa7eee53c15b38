"""One layer's attention as a tap sees it, and the probabilities recomputed from it.

A tap hands over what the model's own softmax sees (q and k after any q/k-norm and rotary
embedding, the scale, an additive bias such as a relative-position table or a mask) or,
where the library already produced them, the probabilities. Probabilities are always
computed in float32 (bf16 drifts by 1e-2 on sharp heads) and can be produced a block of
query rows at a time, so long sequences never hold a whole [B, H, T, T] tensor.

One attention pass. A tap that also holds the values ``v`` lets the engine produce the layer's
attention output itself, from the same blocks of probabilities the metrics read (output block =
``P_block @ V``), instead of running the model's SDPA and then recomputing q·kᵀ and the softmax:
the sink returns that output and the tap hands it to the model. Where the sink returns None, the
tap runs the model's own kernel as before.
:func:`probekit.engine.kernels.policy.one_pass` is the rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch

__all__ = ["LayerAttention", "Workspace", "no_autocast", "row_blocks", "blocks", "sdpa_dtype", "row_dot"]



@dataclass(frozen=True)
class LayerAttention:
    """What a tap hands over of one layer's attention softmax: a frozen record.

    Either ``q``/``k`` (``[B, H, T, d]``) with ``scale`` and an optional additive ``bias``
    broadcastable to ``[B, H, T, T]`` (a relative-position table, a mask as ``-inf``), or
    ``probs_given`` (``[B, H, T, T]``), where the library produced the probabilities itself.

    ``v`` (``[B, H, T, dv]``, k/v heads already repeated for grouped queries) is given by taps
    that can take the layer's output from the engine (one attention pass); ``out_dtype`` is the
    dtype the model's own kernel would have returned (autocast's). The engine's sink returns that
    output from :meth:`~probekit.engine.sink.MetricSink.attention` (``[B, H, T, dv]``, a transposed
    view of a contiguous ``[B, T, H, dv]``: the layout every family reshapes to next), or None,
    and the tap then runs the model's own kernel. The blocked computation (reused buffers,
    contiguous float32 copies, the output's blocks) lives in the engine
    (:class:`probekit.engine.blocks.LayerBlocks`); :meth:`probs` and :meth:`block` here are the
    plain computation, for whole-layer metrics and references.
    """

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    probs_given: torch.Tensor | None = None
    v: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.probs_given is None and (self.q is None or self.k is None):
            raise ValueError("LayerAttention needs q and k, or probs.")

    @property
    def _q(self) -> torch.Tensor:
        """``q``, on the path that reads it: the tap handed over q and k (else the probabilities)."""
        assert self.q is not None, "this layer's attention was handed over as probabilities, without q"
        return self.q

    @property
    def _k(self) -> torch.Tensor:
        """``k``, on the path that reads it (as :attr:`_q`)."""
        assert self.k is not None, "this layer's attention was handed over as probabilities, without k"
        return self.k

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(batch, heads, tokens)``."""
        t = self.probs_given if self.probs_given is not None else self._q
        return t.shape[0], t.shape[1], t.shape[2]

    @property
    def num_keys(self) -> int:
        """Keys each query attends over (tokens, or a grouped layer's keys)."""
        return self.probs_given.shape[-1] if self.probs_given is not None else self._k.shape[2]

    @property
    def device(self) -> torch.device:
        return (self.probs_given if self.probs_given is not None else self._q).device

    def bias_rows(self, rows: slice, batch: slice) -> torch.Tensor | None:
        """The additive bias of the query ``rows`` of the images ``batch`` (broadcastable), or None."""
        b = self.bias
        if b is None:
            return None
        if b.dim() >= 2 and b.shape[-2] != 1:
            b = b[..., rows, :]
        if b.dim() == 4 and b.shape[0] != 1:
            b = b[batch]
        return b

    def block(self, rows: slice | None = None, batch: slice | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(logits, probs)`` of the query ``rows`` of the images ``batch``, float32 ``[b, H, R, T]``: the
        plain computation (logits None where the tap handed over probabilities)."""
        rows, batch = rows or slice(None), batch or slice(None)
        if self.probs_given is not None:
            return None, self.probs_given[batch, :, rows].float()
        with no_autocast(self.device):
            z = torch.matmul(self._q[batch, :, rows].float() * self.scale, self._k[batch].float().transpose(-1, -2))
            b = self.bias_rows(rows, batch)
            if b is not None:
                z = z + b.float()
        return z, torch.softmax(z, dim=-1)

    def probs(self, rows: slice | None = None) -> torch.Tensor:
        """Float32 probabilities of the query ``rows`` (all by default): ``[B, H, R, T]``, also under
        bf16/fp16 autocast."""
        return self.block(rows)[1]

    def groups(self, items: slice) -> LayerAttention:
        """The groups ``items`` (a slice of the leading ``B * G`` axis) of a grouped layer's attention."""
        if self.probs_given is not None:
            return LayerAttention(probs_given=self.probs_given[items])
        bias = self.bias
        if bias is not None and bias.dim() == 4 and bias.shape[0] != 1:
            bias = bias[items]
        return LayerAttention(q=self._q[items], k=self._k[items], scale=self.scale, bias=bias)


def sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype ``F.scaled_dot_product_attention`` returns for ``q`` here (autocast's when on)."""
    try:
        if q.is_floating_point() and torch.is_autocast_enabled(q.device.type):
            return torch.get_autocast_dtype(q.device.type)
    except (RuntimeError, TypeError, AttributeError):
        pass
    return q.dtype


class Workspace:
    """Reusable float32 buffers for blocks of logits and probabilities, one set per engine sink.

    Why: every block of every layer needs the same few multi-MB buffers. Allocating them afresh
    page-faults and zero-fills on CPU (large blocks are mmap'ed anew each time) and churns the
    CUDA caching allocator; reusing one set also keeps memory flat across layers and batches.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}  # (name, shape, device) -> view of _buffers[name] (get)
        #: bytes of the chunk buffer that per-row sums run through (:func:`row_dot`,
        #: :mod:`probekit.engine.kernels.block_terms`); the engine sets it within its block budget
        self.scratch_bytes = SCRATCH_BYTES

    def get(self, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
        """A contiguous float32 view of ``shape`` on ``device`` (contents undefined).

        The same view object for the same request: every layer asks for the same few shapes, and
        making each view again (a slice and a view per call) was a tenth of the engine's Python
        per layer (issue 25). Callers write into it (``out=``), never change its shape.
        """
        key = (name, tuple(shape), device)
        view = self._views.get(key)
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            self._buffers.pop(name, None)
            buf = self._buffers[name] = torch.empty(n, dtype=torch.float32, device=device)
            for old in [k for k in self._views if k[0] == name]:  # views of the buffer this one replaces
                del self._views[old]
        view = self._views[key] = buf[:n].view(shape)
        return view

    @contextlib.contextmanager
    def active(self):
        """Make this the workspace :func:`row_dot` draws its scratch buffer from, inside the block."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @property
    def nbytes(self) -> int:
        """Bytes held (what the engine adds to the model's own peak memory)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def drop_views(self) -> None:
        """Forget the views :meth:`get` keeps (made again on the next request): a workspace kept between
        calls (:func:`probekit.engine.probe`) then holds its flat buffers only, no block-shaped tensor."""
        self._views.clear()


_ACTIVE: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar("probekit_workspace", default=None)


def row_dot(a: torch.Tensor, b: torch.Tensor, start: int = 0) -> torch.Tensor:
    """``sum_{k >= start} a[..., k] * b[..., k]`` for two blocks of rows: ``[..., T]`` -> ``[...]``.

    What metrics use for a per-row dot product of probabilities with logits or weights (entropy's
    ``<p, z>`` over the patch keys). Inside the engine (:meth:`Workspace.active`) the rows go
    through a reused product buffer a cache-sized chunk of rows at a time (:attr:`Workspace.scratch_bytes`,
    within the engine's block budget): faster than ``torch.linalg.vecdot`` on the sliced rows
    (which allocates and fills a fresh multi-MB product per block) and than ``einsum`` (one
    ``[1, T] @ [T, 1]`` matrix product per row); measured: benchmarks/RESULTS.md, section
    "Smaller engine choices".
    """
    ws = _ACTIVE.get()
    if ws is None or a.shape != b.shape or a.dtype != torch.float32 or b.dtype != torch.float32:
        return torch.linalg.vecdot(a[..., start:], b[..., start:])
    t = a.shape[-1]
    if not (a.is_contiguous() and b.is_contiguous()):  # rows cut from a block: per leading index
        if a.dim() > 2:
            return torch.stack([row_dot(x, y, start) for x, y in zip(a.unbind(0), b.unbind(0), strict=True)])
        return torch.linalg.vecdot(a[..., start:], b[..., start:])
    af, bf = a.view(-1, t), b.view(-1, t)
    n = af.shape[0]
    step = max(1, min(n, ws.scratch_bytes // (4 * t)))
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    buf = ws.get("row_dot", (step, t), a.device)
    for r in range(0, n, step):
        e = min(r + step, n)
        prod = torch.mul(af[r:e], bf[r:e], out=buf[: e - r])
        torch.sum(prod[:, start:], -1, out=out[r:e])
    return out.view(a.shape[:-1])


#: Default chunk of per-row sums: the product stays in the L2 cache (512 KiB).
SCRATCH_BYTES = 2**19


def no_autocast(device: torch.device):
    """Autocast off (probabilities must be float32 even when the model runs bf16/fp16)."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.autocast(device.type, enabled=False)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return contextlib.nullcontext()


def blocks(start: int, stop: int, batch: int, heads: int, tokens: int, budget_bytes: int):
    """``(images, rows)`` slices covering query rows ``[start, stop)`` of every image, each block's float32
    logits and probabilities within ``budget_bytes`` (at least one row of one image).

    Several whole images per block when they fit, else one image's rows a part at a time: a
    block of one image's heads runs its q·kᵀ, softmax and P·V out of a smaller share of the
    cache than the same rows of every image (benchmarks/attention_floor.py).
    """
    rows = stop - start
    per_image = max(1, heads * tokens * 4 * 2 * rows)
    if budget_bytes >= per_image:
        step = max(1, min(batch, budget_bytes // per_image))
        for b in range(0, batch, step):
            yield slice(b, min(b + step, batch)), slice(start, stop)
        return
    for b in range(batch):
        for r in row_blocks(start, stop, 1, heads, tokens, budget_bytes):
            yield slice(b, b + 1), r


def row_blocks(start: int, stop: int, batch: int, heads: int, tokens: int, budget_bytes: int):
    """Slices of query rows in ``[start, stop)`` whose float32 logits and probabilities fit ``budget_bytes``.

    Always at least one row per block: a budget below one row's size is rounded up to it.
    """
    per_row = max(1, batch * heads * tokens * 4 * 2)  # logits and softmax output alive together
    step = max(1, min(stop - start, budget_bytes // per_row))
    for r in range(start, stop, step):
        yield slice(r, min(r + step, stop))
