"""The engine: batches in, each layer's attention streamed to the metrics, Results out.

Each layer is reduced inside the tap, during the forward pass, by a
:class:`~probekit.engine.sink.MetricSink`, and its probabilities are dropped before the next layer
runs: memory grows with one layer, never with depth. Row-wise metrics share one pass over
blocks of query rows sized to ``block_mb``, so long sequences never hold a whole
``[B, H, T, T]`` tensor. The engine prints nothing; ``progress`` takes a
callback (the CLI passes a rich progress bar).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from probekit._installed import library_versions
from probekit.adapter import ProbedModel
from probekit.attention import SCRATCH_BYTES, Workspace
from probekit.engine.arguments import check_probe_arguments
from probekit.engine.checks import refuse_model
from probekit.engine.sink import ForwardDone, LayerObserver, MetricSink, unlabelled
from probekit.errors import ConfigError
from probekit.geometry import ModelGeometry
from probekit.inputs.images import ImageSet, collate, resolve_images
from probekit.inputs.view import VIEW_IMAGES, names_key, rgb, view_key
from probekit.metric import Metric
from probekit.registry import metrics as metric_registry
from probekit.results import Results, long_table
from probekit.tokens import TokenLayout

__all__ = ["probe", "build_metrics", "MetricSink"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _make_metric(name: str, options: Mapping | None) -> Metric:
    """A registered metric with ``options``, validated against its declared options (ConfigError)."""
    return metric_registry.get(name)(**dict(options or {}))


def build_metrics(metrics: Any) -> list[Metric]:
    """Metric instances from names, ``{name: options}``, ``(name, options)`` pairs or instances.

    >>> [m.label for m in build_metrics(["mad", {"mad": {"units": "patch"}}])]
    ['mad', 'mad[units=patch]']
    """
    if isinstance(metrics, (str, Metric)):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        metrics = list(metrics.items())
    out = []
    for m in metrics:
        if isinstance(m, Metric):
            out.append(m)
        elif isinstance(m, str):
            out.append(_make_metric(m, None))
        elif isinstance(m, tuple) and len(m) == 2:
            out.append(_make_metric(m[0], m[1]))
        elif isinstance(m, Mapping):
            out.extend(_make_metric(k, v) for k, v in m.items())
        else:
            raise ConfigError(f"Cannot make a metric from {m!r}; give a name, (name, options) or a Metric.")
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"The same metric is asked for twice: {labels}.")
    if not out:
        raise ConfigError("No metric given. See `probekit metrics` for the list.")
    return out


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ConfigError(f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}.") from None


def _loader(pm: ProbedModel, images: ImageSet, batch_size: int, num_workers: int, pin: bool):
    ds = images.dataset(pm.preprocess, channels=pm.adapter.in_chans)
    if images.tensor is not None and images.tensor.device.type != "cpu":
        # a tensor already on the device cannot be pinned (DataLoader raises), nor read by worker processes
        pin, num_workers = False, 0
    if images.tensor is not None and not num_workers and not pin:
        return _TensorBatches(images.tensor, batch_size)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=False,
        collate_fn=collate,  # drops images a lazily listed source finds unreadable
        worker_init_fn=_leave_sigterm_to_the_run if num_workers else None,
    )


class _TensorBatches:
    """A preprocessed tensor's batches as the loader would give them (``(indices, images)``), without
    one: slices of the tensor in the main process. Why: a DataLoader's iterator, its per-image
    fetch and stack and the signal handling around its queues (:func:`_signals_deferred`) cost a
    fixed share of a small call on a tensor (issue 25), where no worker decodes anything.

    Unlike the loader's batches (:func:`~probekit.inputs.images.collate`), these leave glibc's malloc as
    it is (:func:`~probekit.inputs.memory.tame`): nothing is decoded here, and the tuning (every freed
    buffer of 128 KiB or more goes back to the system) gives every forward pass in the process, the
    user's own too, fresh pages for its activations (measured: ``benchmarks/bench_call_cost.py --malloc``;
    benchmarks/RESULTS.md, section "Small calls: probekit and timm AttentionExtract over the plain forward")."""

    num_workers, pin_memory = 0, False

    def __init__(self, tensor: torch.Tensor, batch_size: int):
        self.tensor, self.batch_size = tensor, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.tensor)
        for a in range(0, n, self.batch_size):
            b = min(a + self.batch_size, n)
            x = self.tensor[a:b]
            # collate stacks the images: a strided tensor's batch is made the same contiguous copy
            yield torch.arange(a, b), (x if x.is_contiguous() else torch.stack(list(x)))


def _leave_sigterm_to_the_run(worker_id: int) -> None:
    """In a DataLoader worker: ignore SIGTERM. SLURM signals the whole process group; the run
    (the main process) stops as for Ctrl-C and shuts its workers down itself, instead of a
    worker's death ending the model's work with an error (:mod:`probekit.runs.interrupt`). The
    worker was started with SIGTERM blocked (:func:`_batches`): one sent meanwhile is dropped here."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _batches(loader):
    """The loader's iterator; its worker processes start with SIGTERM blocked until they ignore it,
    so a SIGTERM to the process group as they start reaches the main process only."""
    import signal

    if not loader.num_workers or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)  # forks the workers
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # one that came meanwhile is delivered now


def _stack_layers(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-layer ``[N, ...]`` arrays stacked to ``[N, L, ...]``, and where the values are real.

    Staged models (Swin, MViTv2, PiT) have more heads in later stages: layers with fewer heads
    (or smaller maps) are padded with NaN, and the second result marks the real entries (None
    when every layer has the same shape).
    """
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1:
        return np.stack(arrays, axis=1), None
    full = tuple(max(s[d] for s in shapes) for d in range(len(next(iter(shapes)))))
    out = np.full((full[0], len(arrays), *full[1:]), np.nan, dtype=np.float64)
    real = np.zeros(out.shape, dtype=bool)
    for i, a in enumerate(arrays):
        idx: tuple[int | slice, ...] = (slice(None), i, *(slice(0, k) for k in a.shape[1:]))
        out[idx], real[idx] = a, True
    return out, real


def _stack_layers_of(tensors: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_stack_layers` of per-layer tensors: those of one shape and dtype (a plain ViT's) in one
    ``torch.stack`` (the same array as numpy's stack of their arrays, without an array per layer)."""
    first = tensors[0]
    if all(t.shape == first.shape and t.dtype == first.dtype for t in tensors):
        return torch.stack(tensors, dim=1).numpy(), None
    return _stack_layers([t.numpy() for t in tensors])


def _to_table(model: str, names: list[str], metrics: list[Metric], partial: bool = False):
    """Long table rows for scalar metrics; arrays ``[N, L, ...]`` for maps; from each metric's state.

    A ``whole_set`` metric's NaN values are no rows (images it never tested); with ``partial`` (a
    shard of a larger set) such metrics make neither rows nor arrays, nor do dataset-level ones (CKA):
    their state is merged first.
    """
    arrays: dict[str, np.ndarray] = {}
    columns: list[tuple[np.ndarray, ...]] = []  # per scalar metric: image index, layer, head, value
    labels: list[str] = []
    if partial:
        metrics = [m for m in metrics if not m.whole_set]
    for m in metrics:
        per_layer = m.per_image()
        if not per_layer:
            continue
        layers = sorted(per_layer)
        stacked, real = _stack_layers_of([per_layer[layer] for layer in layers])
        if m.is_map:
            arrays[f"{model}/{m.label}"] = stacked
            continue
        if stacked.ndim == 2:
            stacked = stacked[:, :, None]
            heads = np.array([-1])
        else:
            heads = np.arange(stacked.shape[2])
        n, nl, nh = stacked.shape
        flat = np.arange(n * nl * nh)  # row r: image r // (L H), layer (r // H) % L, head r % H (C order)
        cols: tuple[np.ndarray, ...] = (
            flat // (nl * nh), np.asarray(layers)[flat // nh % nl], heads[flat % nh],
            stacked.reshape(-1).astype(np.float64))
        if real is not None:  # staged models: the padding of layers with fewer heads is no row
            keep = real.reshape(-1)
            cols = tuple(c[keep] for c in cols)
        if m.whole_set:  # e.g. a holdout split's training images: no held-out prediction, no row
            cols = tuple(c[~np.isnan(cols[3])] for c in cols)
        if len(cols[0]):
            columns.append(cols)
            labels.append(m.label)
    for m in [] if partial else metrics:  # dataset-level metrics (e.g. CKA): one array for the whole image set
        whole = m.dataset_result()
        if whole is not None:
            arrays[f"{model}/{m.label}"] = whole
    if not columns:
        return pd.DataFrame(columns=["model", "image", "layer", "head", "metric", "value"]), arrays
    image, layer, head, value = (np.concatenate(c) for c in zip(*columns, strict=True))
    metric = np.repeat(np.arange(len(labels)), [len(c[0]) for c in columns])
    # in the table's column types at once: Results then takes it as it is (no conversion pass)
    return long_table(model, np.asarray(names, dtype=object)[image], layer, head, labels, metric, value), arrays


@dataclass
class _Plan:
    """What :func:`probe` resolved its arguments to: one model, metrics, images, compute settings."""

    pm: ProbedModel
    name: str
    metrics: list[Metric]
    images: ImageSet
    layers: list[int] | None
    dtype: torch.dtype | None


def _resolve(model, images, metrics, layers, device, dtype, strict, label, partial: bool = False) -> _Plan:
    """Arguments -> a :class:`_Plan`: the model loaded (and moved), metrics built and checked against it."""
    from probekit.models import load

    pm = load(model) if isinstance(model, str) else model
    if layers is not None:
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i < pm.num_layers]
        if bad:
            raise ConfigError(
                f"layers={bad} do not exist: {pm.label} has {pm.num_layers} layers, numbered 0 to "
                f"{pm.num_layers - 1}. Pass indices in that range, or leave layers out for all of them."
            )
    if device is not None:
        pm.to(device)
    cdtype = resolve_dtype(dtype)
    mets = build_metrics(metrics)
    imgs = resolve_images(images, strict=strict)
    for m in mets:
        m.reset()
        refuse_model(m, pm.adapter)
    labelled = [m for m in mets if m.needs_labels]
    if labelled and imgs.labels is None:
        raise ConfigError(unlabelled(labelled))
    for m in labelled if not partial else ():  # a part of a larger set is checked as the whole set
        m.check_labels([str(v) for v in imgs.labels or ()])
    return _Plan(pm, label or pm.label, mets, imgs, layers, cdtype)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _run_batches(plan: _Plan, sink: MetricSink, batch_size: int, num_workers: int, progress,
                 views: list | None = None) -> list[int]:
    """The batch loop: each batch through the model with the sink tapped in; metric state updated.
    With ``views`` (a list), the first images' inputs are added to it as the model saw them
    (:func:`probekit.inputs.view.rgb`).

    Returns the indices (into ``plan.images``) of the images done, in order: every finished
    batch's values live in the metrics' state.
    """
    pm, dev = plan.pm, plan.pm.device
    done: list[int] = []
    loader = _loader(pm, plan.images, batch_size, num_workers, pin=dev.type == "cuda")
    # eval mode (no dropout) for the run; a wrapped module gets its own mode back, also on error
    batches = None
    queues = bool(loader.num_workers)  # worker processes: their queues must not be interrupted halfway
    try:
        with _signals_deferred(queues):
            batches = _batches(loader)
        with torch.inference_mode(), pm.adapter.evaluating(), pm.adapter.tap(sink), _autocast(dev, plan.dtype):
            while True:
                with _signals_deferred(queues):  # the loader's queues: never interrupted halfway (see there)
                    item = next(batches, None)
                if item is None:
                    break
                idx, x = item
                if x is None:  # every image of the batch unreadable (lazily listed sources only)
                    continue
                x = x.to(dev, non_blocking=True)
                if views is not None and sum(map(len, views)) < VIEW_IMAGES:
                    views.append(rgb(x[: VIEW_IMAGES - sum(map(len, views))]))
                sink.start(pm.layout(x), pm.geometry(x), batch=(idx, x))
                try:
                    pm.adapter.forward(x)
                except ForwardDone:  # every wanted layer reported (stop_early): nothing reads the rest
                    pass
                sink.finish()
                # a tensor's ints at once: iterating it makes a 0-d tensor per image
                done.extend(idx.tolist() if isinstance(idx, torch.Tensor) else (int(i) for i in idx))
                if progress is not None:
                    progress(len(done), len(plan.images))
    finally:
        if batches is not None:
            with _signals_deferred(queues):
                _close(batches)
    return done


def _signals_deferred(needed: bool = True) -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGINT held for the block and delivered right after it, to whatever handler was
    installed (a run's: Ctrl-C's KeyboardInterrupt, SIGTERM's Terminated).

    Why: a handler that raises can fire inside ``multiprocessing.Queue.put`` after it took the
    queue's lock; the lock stays taken, and the DataLoader's shutdown then waits on it forever
    (seen: a SIGTERM'd run that printed its resume line and never exited). The loader's queues
    are used only in such blocks, which last one batch's fetch at most. Main thread only (where
    Python runs signal handlers). ``needed=False`` (a loader without worker processes, hence
    without queues): nothing is held (a null context: no generator per batch).
    """
    if not needed or threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return _held_signals()


@contextlib.contextmanager
def _held_signals() -> Iterator[None]:
    """:func:`_signals_deferred`'s block, in the main thread."""
    held: list[tuple[int, Any]] = []

    def hold(signum: int, frame: Any) -> None:
        held.append((signum, frame))

    before: dict[int, Any] = {s: signal.signal(s, hold) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if held:
            signum, frame = held[0]
            handler = before[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _close(batches: Any) -> None:
    """End a loader iterator's worker processes now, also when the run was interrupted.

    Why: workers ignore SIGTERM (:func:`_leave_sigterm_to_the_run`). An interrupted loop leaves its
    iterator referenced by the traceback, so torch would shut the workers down only when it is
    collected, possibly after ``multiprocessing``'s exit hook, whose ``terminate()`` (a SIGTERM)
    they ignore and whose ``join()`` then waits forever. A worker still alive after torch's own
    shutdown is killed (SIGKILL cannot be ignored).
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:  # no worker processes (num_workers=0)
        return
    shutdown()
    for worker in getattr(batches, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _provenance(plan: _Plan, layout: TokenLayout | None, batch_size: int, seconds: float,
                geometry: ModelGeometry | None = None) -> dict:
    """``Results.meta``: what ran (model, adapter, layout, metrics with options), on what, how."""
    pm, lay = plan.pm, layout
    return {
        "model": plan.name,
        "spec": pm.spec,
        "model_meta": {k: v for k, v in pm.meta.items() if isinstance(v, (str, int, float, bool, dict, list))},
        "adapter": pm.adapter.name,
        "layout": None if lay is None else {"num_prefix": lay.num_prefix, "grid": list(lay.grid),
                                            "patch_size": list(lay.patch_size),
                                            "prefix_kinds": list(lay.prefix_kinds)},
        "geometry": _geometry_meta(geometry, plan.metrics),
        "metrics": {m.label: {"name": m.name, "options": m.options(), "unit": m.unit,
                              "display_name": m.display_name} for m in plan.metrics},
        "images": {"count": len(plan.images), "fingerprint": plan.images.fingerprint(),
                   "skipped": plan.images.skipped, "notes": plan.images.notes},
        "batch_size": batch_size,
        "device": str(pm.device),
        "dtype": str(plan.dtype or torch.float32),
        "seconds": seconds,
        "versions": library_versions(),
    }


def _geometry_meta(geometry: ModelGeometry | None, metrics: list[Metric]) -> dict | None:
    """``Results.meta["geometry"]`` with each metric's per-layer reference value (None where it has
    none): what figures draw per stage of a windowed, pooled or staged model."""
    if geometry is None:
        return None
    meta = geometry.meta()
    if meta is not None:
        meta["references"] = {
            m.label: [m.reference_value(g) for g in map(geometry.layer, range(geometry.num_layers))] for m in metrics}
    return meta


def _decoded(imgs: ImageSet, done: list[int]) -> ImageSet:
    """The images that were decoded, in order; the others (e.g. a truncated JPEG) join ``skipped``."""
    if done == list(range(len(imgs))):
        return imgs
    out = imgs.subset(done)
    lost = sorted(set(range(len(imgs))) - set(done))
    out.skipped = list(imgs.skipped) + [(imgs.names[i], "cannot be decoded") for i in lost]
    return out


#: a workspace of at most this many bytes is kept for the next call in the same thread (see :func:`_workspace`)
KEEP_WORKSPACE_BYTES = 8 * 2**20
_KEPT = threading.local()


@contextlib.contextmanager
def _workspace() -> Iterator[Workspace]:
    """The block buffers for one call: those of the previous call in this thread when it kept them.

    Why: a fresh workspace's buffers are new pages on the first layer of every call, each one a
    page fault (~3 us on this project's VM, more with malloc tuned: :mod:`probekit.inputs.memory`),
    a visible share of a small call (issue 25). Only a small one is kept (short sequences; the
    blocked path's multi-MB blocks are given back as before), and a call running inside another
    in the same thread (an observer's own probe) makes its own.
    """
    workspace = getattr(_KEPT, "workspace", None) or Workspace()
    _KEPT.workspace = None  # in use
    workspace.scratch_bytes = SCRATCH_BYTES  # as a new one has it (the sink sets it per block pass)
    try:
        yield workspace
    finally:
        if workspace.nbytes <= KEEP_WORKSPACE_BYTES:
            workspace.drop_views()
            _KEPT.workspace = workspace


def probe(
    model: ProbedModel | str,
    images: Any,
    metrics: Any = ("mad",),
    *,
    batch_size: int = 32,
    layers: Iterable[int] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int = 0,
    block_mb: float | None = None,
    attention_pass: str = "auto",
    strict: bool = False,
    label: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    observer: LayerObserver | None = None,
    partial: bool = False,
    stop_early: bool = True,
) -> Results:
    """Probe a model's attention over an image set.

    Args:
        model: a :class:`ProbedModel`, or an alias/spec passed to :func:`probekit.load`.
        images: paths, a folder, ``"sample"``, PIL images, or a preprocessed ``[N, 3, H, W]`` tensor.
        metrics: names, ``{name: options}`` or Metric instances.
        batch_size: images per forward pass.
        layers: layer indices to probe (default: all).
        device: where to run (default: where the model is). The model is moved there.
        dtype: compute dtype (``"bf16"``/``"fp16"`` autocast); probabilities are always float32.
        num_workers: DataLoader workers that decode and preprocess images.
        block_mb: memory budget (MiB) for one block of query rows' logits and probabilities
            (default: 8 on CPU, 256 on accelerators).
        attention_pass: ``"auto"`` (default), ``"fused"``, ``"separate"`` or ``"kernel"``. ``"fused"``: taps
            that hold q, k and v (transformers, timm, open_clip) get each layer's attention
            output from the probability blocks the metrics read, one attention pass instead of
            the model's kernel plus a recomputation; ``"separate"``: the model's own kernel;
            ``"auto"``: on CPU fused from 64 tokens where the C row kernel built, from 150
            without it (:func:`probekit.engine.kernels.policy.one_pass`; measured:
            benchmarks/RESULTS.md, section "One pass on CPU: the auto rule"), and always on
            accelerators. ``"kernel"``: the fused Triton kernel (CUDA, or
            ``TRITON_INTERPRET=1`` for tests) for the metrics that declare it.
        strict: stop on an unreadable image instead of skipping it.
        label: the model's name in the table (default: ``model.label``).
        progress: called with ``(images done, images total)`` after each batch.
        observer: reads every layer of the same forward passes before the metrics do
            (:class:`~probekit.engine.sink.LayerObserver`; the report's explorer records its
            showcase images so, without a pass of its own).
        partial: ``images`` are a part of a larger set (the Ray engine's chunks): metrics whose values
            need the whole set (``whole_set``, e.g. k-NN) make no rows or arrays; merge their state.
        stop_early: end each forward pass once every wanted layer has reported (default): the blocks
            after the last wanted layer, the final norm and the head are not run, since no metric reads
            them (the model's output is never returned). The values are the same either way;
            ``False`` runs every forward pass to its end (e.g. for hooks of your own on later modules).

    Returns:
        :class:`Results` with one row per image x layer x head x metric.
    """
    layers = check_probe_arguments(model=model, metrics=metrics, batch_size=batch_size, layers=layers,
                                   device=device, num_workers=num_workers, block_mb=block_mb)
    plan = _resolve(model, images, metrics, layers, device, dtype, strict, label, partial)
    with _workspace() as workspace:
        sink = MetricSink(plan.metrics, layers=plan.layers, block_mb=block_mb, attention_pass=attention_pass,
                          observer=observer, workspace=workspace, labels=plan.images.labels,
                          stop_early=stop_early)
        t0 = time.perf_counter()
        views: list | None = [] if any(m.is_map for m in plan.metrics) else None
        done = _run_batches(plan, sink, batch_size, num_workers, progress, views)
        seconds = time.perf_counter() - t0
    plan.images = _decoded(plan.images, done)
    table, arrays = _to_table(plan.name, plan.images.names, plan.metrics, partial)
    grid = None if sink.layout is None else tuple(sink.layout.grid)
    if views and any(a.ndim >= 4 and tuple(a.shape[-2:]) == grid for a in arrays.values()):
        arrays[view_key(plan.name)] = np.concatenate(views)  # what per-image maps are drawn over
        arrays[names_key(plan.name)] = np.array(plan.images.names[: len(arrays[view_key(plan.name)])], dtype=str)
    if plan.images.labels is not None:  # a labelled source: the label of each row's image
        table["label"] = pd.Series(plan.images.labels, index=plan.images.names).reindex(table["image"]).to_numpy()
    meta = _provenance(plan, sink.layout, batch_size, seconds, sink.geometry)
    if len(table):  # long_table's: in its column types already
        return Results._of_long_table(table, arrays, meta)
    return Results(table, arrays, meta)
