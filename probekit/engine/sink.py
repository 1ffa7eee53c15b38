"""The engine's per-layer reduction: :class:`MetricSink` takes each tapped layer and folds it into every metric.

:func:`probekit.engine.probe` runs the forward pass with a sink in the adapter's tap; a sink is also what
the conformance kit and the benchmarks drive directly. Blocks, the one-pass output and the
kernel are chosen here, layer by layer (:mod:`probekit.attention`, :mod:`probekit.engine.kernels.block_terms`,
:mod:`probekit.engine.kernels.triton`, :mod:`probekit.engine.grouped` for windowed layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from probekit.attention import SCRATCH_BYTES, LayerAttention, Workspace, blocks, no_autocast
from probekit.engine.blocks import LayerBlocks
from probekit.engine.checks import refuse_layers
from probekit.engine.grouped import reduce_groups
from probekit.engine.kernels import cpu_pass
from probekit.engine.kernels import triton as kernel
from probekit.engine.kernels.block_terms import BLOCK_TERMS, layer_terms, softmax_with_terms, terms_served
from probekit.engine.kernels.policy import ATTENTION_PASSES, one_pass
from probekit.engine.rows import row_sum
from probekit.errors import ConfigError
from probekit.geometry import LayerGeometry, ModelGeometry
from probekit.metric import Block, Metric
from probekit.metric.base import query_span
from probekit.metric.terms import RowTerms
from probekit.tokens import TokenLayout

__all__ = ["MetricSink", "LayerObserver", "ForwardDone", "ROW_TERMS", "unlabelled"]

#: which per-row sums blocks come with (``MetricSink(row_terms=...)``)
ROW_TERMS = ("auto", "torch", "none")


class LayerObserver(Protocol):
    """Reads the layers of a forward pass beside the metrics, before they reduce them (the report's
    explorer records its showcase images so, in the probing pass: :class:`probekit.runs.explorer.Recorder`).

    It is handed each layer's :class:`~probekit.attention.LayerAttention` record as the metrics are
    (frozen: its plain ``block``/``probs`` compute probabilities); what it raises ends the probe, so it
    keeps its own failures.
    """

    def start(self, images: Any, pixels: torch.Tensor | None, layout: TokenLayout) -> None:
        """A batch begins: ``images`` (its indices into the image set) and ``pixels`` (the model's input)."""

    def attention(self, layer: int, attn: LayerAttention, layout: TokenLayout | LayerGeometry) -> None:
        """One layer of the batch, with its layout (a windowed, pooled or staged layer's geometry)."""

    def finish(self) -> None:
        """The batch's forward pass is done."""


class ForwardDone(Exception):
    """Raised from inside the forward pass by a sink with ``stop_early`` once every layer it waits for has
    reported: what the model computes after that (later blocks, its final norm and head) is read by
    nothing. :func:`probekit.engine.probe` catches it around the forward pass."""


def unlabelled(metrics: list[Metric]) -> str:
    """The one-line refusal of metrics that need labels on an image set without them."""
    names = ", ".join(sorted({m.name for m in metrics}))
    return (f"Metric(s) {names} need a class label per image, and this image set has none: give a labelled "
            "source: class folders (pk.sources.ClassFolder(root); in a run file images: {kind: classes, path: ...}), "
            "a manifest with a label column (kind: manifest, label_column: ...), labelled webdataset shards or an "
            "hf dataset with a label_column.")


def _terms_offered(m: Metric, served: frozenset[str]) -> bool:
    """Whether ``m`` declared kernel terms that the current path makes."""
    return bool(m.kernel_terms) and m.kernel_terms <= served


class MetricSink:
    """Receives each layer from a tap and reduces it with every metric at once.

    Row-wise metrics share one pass over blocks of query rows: each block's float32
    probabilities are computed once, into buffers reused for every block, layer and batch
    (a :class:`~probekit.attention.Workspace`), and each metric folds the block into a
    ``[B, H, ...]`` running sum (its :meth:`~probekit.Metric.row_values`, summed over the block's
    rows). Nothing of a layer outlives its :meth:`attention` call except these small sums, so
    memory is one block, whatever the depth.
    Per-layer values stay on the model's device until :meth:`finish` (one host sync per batch).

    Args:
        metrics: the metric instances.
        layers: layer indices wanted (None: all).
        block_mb: budget in MiB for one block's logits and probabilities together. None: 8 MiB
            on CPU (smaller blocks keep q·kᵀ, the softmax and P·V in the cache until the
            per-block overhead wins; measured: benchmarks/RESULTS.md, section "Block budget on
            CPU (block_mb)") and 256 MiB on accelerators (fewer, larger kernels). Per-row sums
            (entropy's) add a chunk buffer of at most half of it (512 KiB at most on CPU). Layers
            that the C kernel's attention pass takes (:mod:`probekit.engine.kernels.cpu_pass`) have
            no blocks: a few query rows per thread at a time.
        attention_pass: ``"auto"``, ``"fused"``, ``"separate"`` or ``"kernel"``: whether a tap
            that hands over v gets the layer's attention output from the blocks the metrics
            read (one pass) or runs the model's own kernel (see
            :func:`probekit.engine.kernels.policy.one_pass`); ``"kernel"`` runs the fused Triton kernel
            (:mod:`probekit.engine.kernels.triton`) for the metrics that declare ``kernel_terms``, the
            blocked path for the others.
        row_terms: which per-row sums blocks come with, for metrics that declare ``kernel_terms``:
            ``"auto"`` (the C row kernel's on CPU where it built, PyTorch's elsewhere), ``"torch"``
            (PyTorch's, :data:`~probekit.engine.kernels.block_terms.BLOCK_TERMS`) or ``"none"``
            (every metric reads probabilities). The conformance kit runs each against the others.
        observer: a :class:`LayerObserver` that reads every layer first (it makes the sink ask for
            attention even when no metric does).
        workspace: the :class:`~probekit.attention.Workspace` whose buffers the blocks use (default: a new
            one); :func:`probekit.engine.probe` hands over one kept from the previous call.
        labels: the class label of every image of the set, by image index, for metrics that declare
            ``needs_labels`` (each batch's are handed to them in :meth:`start`).
        stop_early: end each forward pass with :class:`ForwardDone` as soon as every wanted layer
            (``layers``, else each of the geometry's ``num_layers``) has reported what the sink asks
            for (attention, block outputs or both). Only a batch begun with a geometry that knows its
            layer count stops; a layer never reported means no stop, never a lost layer.
    """

    def __init__(self, metrics: list[Metric], layers=None, block_mb: float | None = None,
                 attention_pass: str = "auto", row_terms: str = "auto", observer: LayerObserver | None = None,
                 workspace: Workspace | None = None, labels: Sequence[Any] | None = None,
                 stop_early: bool = False):
        if attention_pass not in ATTENTION_PASSES:
            raise ConfigError(f"attention_pass must be one of {', '.join(ATTENTION_PASSES)}; got {attention_pass!r}.")
        if row_terms not in ROW_TERMS:
            raise ConfigError(f"row_terms must be one of {', '.join(ROW_TERMS)}; got {row_terms!r}.")
        self.row_terms = row_terms
        self.attention_pass = attention_pass
        self.kernel_served: set[str] = set()  # labels the fused kernel reduced (others: blocked path)
        self.metrics = metrics
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        self.observer = observer
        self.wants_attention = any(m.needs == "attention" for m in metrics) or observer is not None
        self.wants_hidden = any(m.needs == "hidden" for m in metrics)
        self.budget = None if block_mb is None else int(block_mb * 2**20)
        self.workspace = Workspace() if workspace is None else workspace
        self._rowwise = [m for m in metrics if m.needs == "attention" and m.reduces == "rows"]
        self._other_attn = [m for m in metrics if m.needs == "attention" and m.reduces != "rows"]
        self._hidden = [m for m in metrics if m.needs == "hidden"]
        self._labelled = [m for m in metrics if m.needs_labels]
        if self._labelled and labels is None:
            raise ConfigError(unlabelled(self._labelled))
        self.labels = labels
        self.layout: TokenLayout | None = None
        self.geometry: ModelGeometry | None = None
        self.values: dict[str, dict[int, torch.Tensor]] = {}
        #: the C kernel's pass of the last layer it took, for the next layers of the same shape (attention())
        self._prepared: cpu_pass.Prepared | None = None
        self.stop_early = stop_early
        #: with stop_early, the layers whose attention / block output this batch still waits for (start())
        self._awaited: tuple[set[int], set[int]] | None = None

    def start(self, layout: TokenLayout, geometry: ModelGeometry | None = None,
              batch: tuple[Any, torch.Tensor | None] | None = None) -> None:
        """Begin a batch with its input layout and (windowed, pooled, staged models) per-layer geometry.

        Every metric is checked against the geometry of every wanted layer here, before the forward pass.
        ``batch``: the batch's ``(image indices, pixels)``, for the observer (without it, the observer
        is told of a batch of no images).
        """
        self.layout = layout
        self.geometry = geometry if geometry is not None else ModelGeometry(layout)
        self._prepared = None
        for m in self.metrics:  # a global model: its layers are the input's layout
            refuse_layers(m, geometry if geometry is not None else ModelGeometry(layout, num_layers=1),
                          self.layers if geometry is not None else None)
        self.values = {m.label: {} for m in self.metrics}
        self._awaited = self._awaiting(geometry)
        if self._labelled:  # before the layers: a batch's labels and its features arrive together
            assert self.labels is not None and batch is not None, "labelled metrics need the batch's image indices"
            labels = [str(self.labels[int(i)]) for i in batch[0]]
            for m in self._labelled:
                m.on_labels(labels)
        if self.observer is not None:
            images, pixels = batch if batch is not None else ((), None)
            self.observer.start(images, pixels, layout)

    def _awaiting(self, geometry: ModelGeometry | None) -> tuple[set[int], set[int]] | None:
        """The layers whose attention and whose block output the batch waits for before it stops (stop_early)."""
        if not self.stop_early or geometry is None or geometry.num_layers < 1:
            return None
        wanted = set(range(geometry.num_layers)) if self.layers is None else set(self.layers)
        return (set(wanted) if self.wants_attention else set(), set(wanted) if self.wants_hidden else set())

    def _reported(self, kind: int, layer: int) -> None:
        """Layer ``layer`` handed over its attention (``kind`` 0) or block output (1): with nothing left to
        wait for, the forward pass ends here (:class:`ForwardDone`)."""
        awaited = self._awaited
        if awaited is None:
            return
        awaited[kind].discard(layer)
        if not awaited[0] and not awaited[1]:
            self._awaited = None  # once per batch
            raise ForwardDone

    def _keep(self, m: Metric, layer: int, v: torch.Tensor | None) -> None:
        if v is not None:
            self.values[m.label][layer] = v.detach().float()  # to the host in finish()

    def block_budget(self, device: torch.device) -> int:
        """Bytes for one block's logits and probabilities on ``device``."""
        if self.budget is not None:
            return self.budget
        return (8 if device.type == "cpu" else 256) * 2**20

    def attention(self, layer: int, attn: LayerAttention) -> torch.Tensor | None:
        """Reduce one tapped layer with every metric; returns the layer's attention output where the
        engine made it from ``attn.v`` (one attention pass: ``[B, H, T, dv]``), else None (the tap
        then runs the model's own kernel). With ``stop_early``, the last awaited report raises
        :class:`ForwardDone` instead, after its values are kept."""
        output = self._attention(layer, attn)
        if self._awaited is not None:
            self._reported(0, layer)
        return output

    def _attention(self, layer: int, attn: LayerAttention) -> torch.Tensor | None:
        assert self.geometry is not None, "start() begins every batch"
        lay = self.geometry.layer(layer)
        prepared = self._prepared
        if prepared is not None and prepared.takes(attn, lay):  # a layer like the last one the C kernel took
            awaited = self._awaited  # the last layer stop_early waits for: its output is never used
            last = awaited is not None and not awaited[1] and len(awaited[0]) == 1 and layer in awaited[0]
            output, sums = prepared.run(attn, output=not last)
            values = self.values
            for label, rows in prepared.rows.items():
                v = sums[label]
                if v is None:  # a metric declined the terms (e.g. an underflowed patch mass): the whole path below
                    break
                # a new float32 tensor that nothing tracks (Prepared takes no layer autograd follows): kept as is
                values[label][layer] = v.div_(rows)
            else:
                return output
        b, h, t = attn.shape
        if self.observer is not None:
            with no_autocast(attn.device):
                self.observer.attention(layer, attn, lay)
        if isinstance(lay, LayerGeometry):  # windows, pooled keys, class attention: group by group
            self._reduce_groups(layer, attn, lay, b, t)
            return None
        lay.check(t)
        comp = LayerBlocks(attn, self.workspace)  # its float32 copies of q, k, v: the same buffers every layer
        with no_autocast(attn.device), self.workspace.active():  # metric maths in float32 under a bf16/fp16 forward
            self._reduce(layer, attn, comp, lay, b, h, t)
        return comp.output

    def _reduce(self, layer: int, attn: LayerAttention, comp: LayerBlocks, lay: TokenLayout, b: int, h: int,
                t: int) -> None:
        rest = self._rowwise
        if rest and kernel.wanted(attn, self.attention_pass):
            offered = [m for m in rest if _terms_offered(m, frozenset(kernel.TERMS))]
            made = kernel.run_layer(comp, lay, offered, output=attn.v is not None)
            done = set()
            for m in offered:
                q = query_span(m, lay)
                v = row_sum(m, Block(rows=q, layout=lay, terms=made.rows(q)))
                if v is not None:
                    self._keep(m, layer, v / max(q.stop - q.start, 1))
                    done.add(m.label)
            self.kernel_served |= done
            rest = [m for m in rest if m.label not in done]  # the blocked path, same run
        if (rest and comp.output is None and one_pass(attn, self.attention_pass) and self.row_terms == "auto"
                and cpu_pass.applies(attn, rest)):  # on CPU: the whole layer in one call of the C kernel
            prepared = cpu_pass.Prepared(attn, lay, rest, self.workspace)
            comp.output, sums = prepared.run(attn)
            if (rest == self._rowwise and not self._other_attn and self.observer is None
                    and all(v is not None for v in sums.values())):
                self._prepared = prepared  # the next layers of this shape take it at once (attention())
            for m in rest:
                v = sums[m.label]
                if v is not None:
                    self._keep(m, layer, v / prepared.rows[m.label])
            rest = [m for m in rest if sums[m.label] is None]  # the blocked path (the output is made)
        fused = bool(rest) and comp.output is None and one_pass(attn, self.attention_pass)
        if fused:
            comp.start_output()
        if rest:
            spans = {m.label: query_span(m, lay) for m in rest}
            served = self._terms_served(attn)
            termed = [m for m in rest if _terms_offered(m, served)]
            terms: RowTerms | None = None
            if termed:  # per-row terms of the whole layer, made block by block next to the softmax
                terms = layer_terms(b, h, t, lay.num_prefix, frozenset().union(*(m.kernel_terms for m in termed)),
                                    attn.device, self.workspace)
                t_lo = min(spans[m.label].start for m in termed)
                t_hi = max(spans[m.label].stop for m in termed)
            by_terms = {m.label for m in termed}
            acc = self._block_sums(comp, lay, [m for m in rest if m.label not in by_terms], spans, b, h, t, fused,
                                   None if terms is None else (t_lo, t_hi, terms))
            redo = []
            for m in termed:  # one reduction per layer and metric
                assert terms is not None
                q = spans[m.label]
                v = row_sum(m, Block(rows=q, layout=lay, terms=terms.rows(q)))
                if v is None:  # e.g. a patch mass lost to underflow: the metric's own maths, blocks again
                    redo.append(m)
                else:
                    acc[m.label] = v
            if redo:
                acc.update(self._block_sums(comp, lay, redo, spans, b, h, t, False, None))
            for m in rest:
                q = spans[m.label]
                self._keep(m, layer, acc[m.label] / max(q.stop - q.start, 1))
        for m in self._other_attn:
            self._keep(m, layer, m.on_attention(layer, attn, lay))
        comp.release()

    def _terms_served(self, attn: LayerAttention) -> frozenset[str]:
        """The per-row terms this layer's blocks come with (``row_terms``)."""
        if attn.probs_given is not None or self.row_terms == "none":
            return frozenset()
        return BLOCK_TERMS if self.row_terms == "torch" else terms_served(attn.device)

    def _block_sums(self, comp: LayerBlocks, lay: TokenLayout, metrics: list[Metric], spans: dict[str, slice],
                    b: int, h: int, t: int, fused: bool, with_terms) -> dict[str, torch.Tensor]:
        """One pass over the layer's blocks: each metric's row values summed over its query rows (``[B, H, ...]``);
        with ``fused``, the attention output too; with ``with_terms`` (``(lo, hi, terms)``), the per-row
        terms of the rows ``[lo, hi)`` written into ``terms`` next to each block's softmax."""
        if metrics:
            lo = min(spans[m.label].start for m in metrics)
            hi = max(spans[m.label].stop for m in metrics)
        else:
            lo, hi = t, 0
        if with_terms is not None:
            lo, hi = min(lo, with_terms[0]), max(hi, with_terms[1])
            if fused and not metrics:  # every row through the row kernel, prefix rows too: no small blocks
                lo, hi = 0, t
        # the output needs every row: prefix rows (and any after hi) in blocks of their own, so
        # the metrics' blocks stay whole (a block cut short would be copied to be reshaped)
        segments = [(0, lo), (lo, hi), (hi, t)] if fused else [(lo, hi)]
        budget = self.block_budget(comp.device)
        # chunks of per-row sums: cache-sized on CPU; on accelerators whole blocks (fewer launches)
        self.workspace.scratch_bytes = min(SCRATCH_BYTES, budget // 2) if comp.device.type == "cpu" else budget // 2
        acc: dict[str, torch.Tensor] = {}
        for bs, blk in (x for s0, s1 in segments if s1 > s0 for x in blocks(s0, s1, b, h, t, budget)):
            into = None
            if with_terms is not None and with_terms[0] < blk.stop and blk.start < with_terms[1]:
                into = with_terms[2]
            # no metric here reads the probabilities themselves: the output may scale P·V's rows instead
            only_pv = fused and not any(spans[m.label].start < blk.stop and blk.start < spans[m.label].stop
                                        for m in metrics)
            z, p, inv = self._block(comp, bs, blk, lay, into, only_pv)
            if fused:
                comp.add_output(blk, p, self.workspace, batch=bs, row_scale=inv)
            for m in metrics:
                q = spans[m.label]
                s, e = max(blk.start, q.start), min(blk.stop, q.stop)
                if s >= e:
                    continue
                sl = slice(s - blk.start, e - blk.start)
                part = row_sum(m, Block(rows=slice(s, e), layout=lay, probs=p[:, :, sl],
                                        logits=None if z is None else z[:, :, sl]))
                assert part is not None  # a block with probabilities always gets an answer (row_sum)
                if m.label not in acc:
                    acc[m.label] = part.new_zeros((b, *part.shape[1:]))
                acc[m.label][bs] += part
            del z, p
        return acc

    def _block(self, comp: LayerBlocks, batch: slice, rows: slice, layout: TokenLayout, into: RowTerms | None,
               only_pv: bool):
        """``(logits, probs, row_scale)`` of a block of query rows of some images. With ``into`` (a layer's
        :class:`~probekit.metric.terms.RowTerms`), the block's per-row terms are written there while the
        softmax writes the block (:mod:`probekit.engine.kernels.block_terms`); with ``only_pv`` too (no metric reads
        this block), the rows may be left unnormalized over the logits (``logits`` None then),
        ``row_scale`` being what P·V's rows are multiplied by (else None)."""
        if into is None or comp.attn.probs_given is not None:
            return (*comp.block(rows, workspace=self.workspace, batch=batch), None)
        shape = comp.block_shape(rows, batch)
        z = comp.logits(rows, out=self.workspace.get("logits", shape, comp.device), batch=batch)
        p, inv = softmax_with_terms(z, batch, rows, layout, self.workspace, into, unnormalized=only_pv,
                                    native=self.row_terms != "torch")
        return (None, p, inv) if inv is not None else (z, p, None)  # unnormalized rows overwrote the logits

    def _reduce_groups(self, layer: int, attn: LayerAttention, geo: LayerGeometry, b: int, t: int) -> None:
        geo.check(b, t, attn.num_keys, layer)
        with no_autocast(attn.device), self.workspace.active():
            vals = reduce_groups(self._rowwise, attn, geo, self.block_budget(attn.device), self.workspace)
        for m in self._rowwise:
            self._keep(m, layer, vals[m.label])
        for m in self._other_attn:  # whole-layer metrics whose requires admit such layers get its geometry
            self._keep(m, layer, m.on_attention(layer, attn, geo))

    def hidden(self, layer: int, tokens: torch.Tensor, layout: TokenLayout | None = None) -> None:
        assert self.layout is not None, "start() begins every batch"
        lay = self.layout if layout is None else layout  # a staged model's block has its own grid
        for m in self._hidden:
            self._keep(m, layer, m.on_hidden(layer, tokens, lay))
        if self._awaited is not None:
            self._reported(1, layer)

    def finish(self) -> dict[str, dict[int, torch.Tensor]]:
        """The batch's per-layer values on the host (``{label: {layer: tensor}}``); updates metric state."""
        if self.observer is not None:
            self.observer.finish()
        for m in self.metrics:
            for layer, v in m.on_batch_end().items():
                self._keep(m, layer, v)
        for m in self.metrics:
            per_layer = self.values[m.label]
            for layer in list(per_layer):
                v = per_layer[layer] = per_layer[layer].cpu()
                m.update(layer, v)
        return self.values
