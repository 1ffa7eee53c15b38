"""The engine's side of a tapped layer: its attention computed a block of query rows at a time.

A tap hands over a frozen :class:`~probekit.attention.LayerAttention` record; the sink wraps it in a
:class:`LayerBlocks` for the layer's reduction and returns the layer's output (one attention pass)
to the tap. What is made here is made once per layer and dropped at its end: contiguous float32
copies of q·scale, kᵀ and v (into buffers of the sink's :class:`~probekit.attention.Workspace`, the
same for every layer), each block's logits and probabilities, and the output, block by block.
"""

from __future__ import annotations

import torch

from probekit.attention import LayerAttention, Workspace, no_autocast

__all__ = ["LayerBlocks"]


class LayerBlocks:
    """One layer's blocked computation (see the module docstring).

    Args:
        attn: the tap's record.
        workspace: where the per-layer float32 copies go (None: fresh tensors).
    """

    def __init__(self, attn: LayerAttention, workspace: Workspace | None = None):
        self.attn = attn
        self.workspace = workspace
        #: the layer's attention output ``[B, H, T, dv]`` once :meth:`start_output` ran, filled block by block
        self.output: torch.Tensor | None = None
        self._vf: torch.Tensor | None = None
        self._kt: torch.Tensor | None = None
        self._qs: torch.Tensor | None = None

    # the record's facts, for the sink and the kernels
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.attn.shape

    @property
    def device(self) -> torch.device:
        return self.attn.device

    def key_t(self) -> torch.Tensor:
        """Float32 keys as ``[B, H, d, T]`` for ``q @ key_t()``, made contiguous once per layer.

        Why: a tap's k is usually a strided view into the fused qkv projection, and a matmul on
        it copies k again for every block of rows (several times slower on CPU; benchmarks/RESULTS.md,
        section "Smaller engine choices"); one copy serves them all.
        """
        if self._kt is None:
            k = self.attn._k
            buf = self._copy_buffer("k", k)
            self._kt = (k.float().contiguous() if buf is None else buf.copy_(k)).transpose(-1, -2)
        return self._kt

    def _copy_buffer(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """A reused float32 buffer shaped like ``like`` from the workspace (None: allocate afresh).

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
            q = self.attn._q
            if q.requires_grad and torch.is_grad_enabled():  # out= cannot record gradients
                self._qs = (q.float() * self.attn.scale).contiguous()
            else:
                qs = self._copy_buffer("q", q)
                if qs is None:
                    qs = torch.empty(q.shape, dtype=torch.float32, device=q.device)
                self._qs = torch.mul(q.float(), self.attn.scale, out=qs)
        return self._qs

    def logits(self, rows: slice | None = None, out: torch.Tensor | None = None,
               batch: slice | None = None) -> torch.Tensor:
        """Float32 softmax inputs ``q k^T * scale + bias`` of the query rows ``rows``: ``[B, H, R, T]``.

        ``out``: a contiguous buffer to write to. ``batch``: only these images (``[b, H, R, T]``).
        """
        rows, batch = rows or slice(None), batch or slice(None)
        with no_autocast(self.device):
            logits = torch.matmul(self.scaled_queries()[batch, :, rows], self.key_t()[batch], out=out)
            b = self.attn.bias_rows(rows, batch)
            if b is not None:
                logits.add_(b.float())
        return logits

    def block(self, rows: slice | None = None, workspace: Workspace | None = None,
              batch: slice | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(logits, probs)`` of the query rows (of the images ``batch``), both float32 ``[B, H, R, T]``.

        The logits come free with the probabilities (the softmax writes to another buffer);
        they are None where the tap handed over probabilities. With ``workspace``, both are
        views into it, valid until its next use.
        """
        rows, batch = rows or slice(None), batch or slice(None)
        if self.attn.probs_given is not None:
            return None, self.attn.probs_given[batch, :, rows].float()
        if workspace is None:
            logits = self.logits(rows, batch=batch)
            return logits, torch.softmax(logits, dim=-1)
        shape = self.block_shape(rows, batch)
        logits = self.logits(rows, out=workspace.get("logits", shape, self.device), batch=batch)
        probs = torch.ops.aten._softmax.out(logits, -1, False, out=workspace.get("probs", shape, self.device))
        return logits, probs

    def block_shape(self, rows: slice, batch: slice | None = None) -> tuple[int, int, int, int]:
        """``(images, heads, rows, keys)`` of the block of query ``rows`` of the images ``batch``."""
        b, h, t = self.shape
        nb = len(range(*(batch or slice(None)).indices(b)))
        return nb, h, len(range(*rows.indices(t))), self.attn._k.shape[2]

    def start_output(self) -> None:
        """Allocate :attr:`output` (filled block by block by :meth:`add_output`)."""
        b, h, t = self.shape
        v = self.attn.v
        assert v is not None, "one attention pass is for taps that hand over v"
        dtype = self.attn.out_dtype or v.dtype
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
        """Drop the per-layer float32 copies (the output goes back to the tap)."""
        self._kt = self._qs = self._vf = None
