"""One layer's attention as a tap sees it, and the probabilities recomputed from it.

A tap hands over what the model's own softmax sees (q and k after any q/k-norm and rotary
embedding, the scale, an additive bias such as a relative-position table or a mask) or,
where the library already produced them, the probabilities. Probabilities are always
computed in float32 (bf16 drifts by 1e-2 on sharp heads) and can be produced a block of
query rows at a time, so long sequences never hold a whole [B, H, T, T] tensor.

One attention pass. A tap that also holds the values ``v`` lets the engine produce the layer's
attention output itself, from the same blocks of probabilities the metrics read (output block =
``P_block @ V``), instead of running the model's SDPA and then recomputing q·kᵀ and the softmax:
the sink fills :attr:`LayerAttention.output` and the tap hands that to the model. Where the
sink leaves it None, the tap runs the model's own kernel as before.
:func:`probekit.engine.kernels.policy.one_pass` is the rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field

import torch

__all__ = ["LayerAttention", "Workspace", "no_autocast", "row_blocks", "blocks", "sdpa_dtype", "row_dot"]



@dataclass
class LayerAttention:
    """The inputs of one layer's attention softmax.

    Either ``q``/``k`` (``[B, H, T, d]``) with ``scale`` and an optional additive ``bias``
    broadcastable to ``[B, H, T, T]``, or ``probs`` (``[B, H, T, T]``).

    ``v`` (``[B, H, T, dv]``, k/v heads already repeated for grouped queries) is given by taps
    that can take the layer's output from the engine (one attention pass); ``out_dtype`` is
    the dtype the model's own kernel would have returned (autocast's). The engine sets
    ``output`` (``[B, H, T, dv]``, a transposed view of a contiguous ``[B, T, H, dv]``: the
    layout every family reshapes to next, so that reshape is free) or leaves it None.
    """

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    probs_given: torch.Tensor | None = None
    v: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    output: torch.Tensor | None = None
    _vf: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _kt: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _qs: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    #: where the per-layer float32 copies of q, k and v go (the engine's :class:`Workspace`: the same
    #: buffers for every layer); None: fresh tensors
    workspace: Workspace | None = field(default=None, repr=False, compare=False)

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

    def key_t(self) -> torch.Tensor:
        """Float32 keys as ``[B, H, d, T]`` for ``q @ key_t()``, made contiguous once per layer.

        Why: a tap's k is usually a strided view into the fused qkv projection, and a matmul on
        it copies k again for every block of rows (several times slower on CPU; benchmarks/RESULTS.md,
        section "Smaller engine choices"); one copy serves them all.
        """
        if self._kt is None:
            k = self._k
            buf = self._copy_buffer("k", k)
            self._kt = (k.float().contiguous() if buf is None else buf.copy_(k)).transpose(-1, -2)
        return self._kt

    def _copy_buffer(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """A reused float32 buffer shaped like ``like`` from :attr:`workspace` (None: allocate afresh).

        Why: fresh multi-MB copies per layer are new mappings on CPU, page-faulted and zero-filled
        on first touch and unmapped when freed. A modest gain, within this VM's noise (measured:
        benchmarks/RESULTS.md, section "Smaller engine choices").
        """
        if self.workspace is None or (like.requires_grad and torch.is_grad_enabled()):
            return None
        return self.workspace.get(name, tuple(like.shape), like.device)

    def scaled_queries(self) -> torch.Tensor:
        """Float32 ``q * scale``, contiguous, made once per layer (blocks of it are then views).

        The scale multiplies the ``[T, d]`` queries rather than the ``[T, T]`` logits: fewer
        multiplies, the same numbers to float32 rounding.
        """
        if self._qs is None:  # contiguous: ``q * s`` alone would keep q's strided layout
            q = self._q
            if q.requires_grad and torch.is_grad_enabled():  # out= cannot record gradients
                self._qs = (q.float() * self.scale).contiguous()
            else:
                qs = self._copy_buffer("q", q)
                if qs is None:
                    qs = torch.empty(q.shape, dtype=torch.float32, device=q.device)
                self._qs = torch.mul(q.float(), self.scale, out=qs)
        return self._qs

    def logits(self, rows: slice | None = None, out: torch.Tensor | None = None,
               batch: slice | None = None) -> torch.Tensor:
        """Float32 softmax inputs ``q k^T * scale + bias`` of the query rows ``rows``: ``[B, H, R, T]``.

        ``out``: a contiguous buffer to write to. ``batch``: only these images (``[b, H, R, T]``).
        """
        rows, batch = rows or slice(None), batch or slice(None)
        with no_autocast(self._q.device):
            logits = torch.matmul(self.scaled_queries()[batch, :, rows], self.key_t()[batch], out=out)
            if self.bias is not None:
                b = self.bias
                if b.dim() >= 2 and b.shape[-2] != 1:
                    b = b[..., rows, :]
                if b.dim() == 4 and b.shape[0] != 1:
                    b = b[batch]
                logits.add_(b.float())
        return logits

    def probs(self, rows: slice | None = None, workspace: Workspace | None = None) -> torch.Tensor:
        """Float32 probabilities of the query rows ``rows`` (all by default): ``[B, H, R, T]``.

        Always float32, also under bf16/fp16 autocast (the engine runs taps inside it).

        Args:
            rows: query rows to compute (a slice of ``range(T)``).
            workspace: reuse its buffers instead of allocating; the result is then a view into
                the workspace, valid only until the next call with the same workspace.
        """
        return self.block(rows, workspace)[1]

    def block(
        self, rows: slice | None = None, workspace: Workspace | None = None, batch: slice | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(logits, probs)`` of the query rows (of the images ``batch``), both float32 ``[B, H, R, T]``.

        The logits come free with the probabilities (the softmax writes to another buffer);
        they are None where the tap handed over probabilities. With ``workspace``, both are
        views into it, valid until its next use.
        """
        rows, batch = rows or slice(None), batch or slice(None)
        if self.probs_given is not None:
            return None, self.probs_given[batch, :, rows].float()
        if workspace is None:
            logits = self.logits(rows, batch=batch)
            return logits, torch.softmax(logits, dim=-1)
        shape = self.block_shape(rows, batch)
        logits = self.logits(rows, out=workspace.get("logits", shape, self._q.device), batch=batch)
        probs = torch.ops.aten._softmax.out(logits, -1, False, out=workspace.get("probs", shape, self._q.device))
        return logits, probs


    def block_shape(self, rows: slice, batch: slice | None = None) -> tuple[int, int, int, int]:
        """``(images, heads, rows, keys)`` of the block of query ``rows`` of the images ``batch``."""
        b, h, t = self.shape
        nb = len(range(*(batch or slice(None)).indices(b)))
        return nb, h, len(range(*rows.indices(t))), self._k.shape[2]

    def start_output(self) -> None:
        """Allocate :attr:`output` (filled block by block by :meth:`add_output`)."""
        b, h, t = self.shape
        v = self.v
        assert v is not None, "one attention pass is for taps that hand over v"
        dtype = self.out_dtype or v.dtype
        self.output = torch.empty(b, t, h, v.shape[-1], dtype=dtype, device=v.device).transpose(1, 2)
        # float32 like the probabilities, contiguous once per layer: v is usually a strided view
        # into the fused qkv projection, which a matmul would copy again for every block
        buf = self._copy_buffer("v", v)
        self._vf = v.float().contiguous() if buf is None else buf.copy_(v)

    def add_output(self, rows: slice, probs: torch.Tensor, workspace: Workspace | None = None,
                   batch: slice | None = None, row_scale: torch.Tensor | None = None) -> None:
        """Write the output rows ``rows`` (of the images ``batch``): ``probs @ v`` (``probs``: ``[B, H, R, T]``).

        ``row_scale`` (``[B, H, R]``): ``probs`` are unnormalized rows, and the product's rows are
        multiplied by it on their way into the output (the same numbers to float32 rounding).
        """
        batch = batch or slice(None)
        vf, output = self._vf, self.output
        assert vf is not None and output is not None, "start_output() comes first"
        if workspace is None:
            pv = torch.matmul(probs, vf[batch])
        else:
            pv = torch.matmul(probs, vf[batch], out=workspace.get("pv", (*probs.shape[:3], vf.shape[-1]), probs.device))
        if row_scale is None:
            output[batch, :, rows] = pv
        else:
            torch.mul(pv, row_scale[..., None], out=output[batch, :, rows])

    def release(self) -> None:
        """Drop the per-layer float32 copies (the output stays with the model)."""
        self._kt = self._qs = self._vf = None


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
