"""What the report's attention explorer needs, captured while a model runs.

For a few showcase images, per layer and head: the attention of every query patch over every patch
key (a sub-grid of queries only when they do not fit the byte budget), the CLS row (the mean query's
for models without CLS) and the rollout. Every value is stored as ``round(63 * sqrt(p))``, one byte
each: attention probabilities lie in [0, 1], so one code serves every model, layer and head and the
report draws the maps of different models on one colour scale with no stored scale. The square root
keeps resolution where near-uniform attention lives (1/256 is code 4; a linear code of 64 levels
would make it 0), and 64 levels are finer than a colour bar shows while the report's deflate packs
them to about half the bytes of 256 levels (the quickstart's page: 6.6 MB with all 256 query
patches, 14 MB with 256 levels). Decoding is ``p = (code / 63) ** 2``, within half a code of
``sqrt(p)`` (:func:`decode`).

The rows are read in the probing pass: a :class:`Recorder` observes the engine's sink and takes the
layers of the showcase images as their batch goes through the model, before the metrics reduce them
(no forward pass of its own). When every metric came from the cache, :func:`capture` runs the
showcase images through the model alone. Both work for every adapter (ONNX included) and hold one
layer's probabilities of the showcase images at a time.

The arrays are cached per model in ``parts/explorer/<key>.npz``; the key covers the model's
part keys (weights, images, versions), the showcase, the budget and the format.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch  # (imported where a model runs, not with the module)

    from probekit.runs.record import ModelRecord, RunRecord

__all__ = ["explorer_key", "capture", "save", "load", "query_stride", "decode", "Recorder", "ExplorerJob"]

_FORMAT = 2  # 2: sqrt codes without scales, every query the budget allows (1: per-row scaled codes)
#: the largest code: ``code = round(LEVELS * sqrt(p))``
LEVELS = 63
_CHUNK = 8  # showcase images per forward pass in capture()


def explorer_key(part_keys: dict[str, str], showcase: Sequence[str], budget_bytes: int) -> str:
    """Cache key of one model's explorer arrays (its part keys already name weights, images, versions)."""
    blob = json.dumps({"format": _FORMAT, "parts": sorted(part_keys.values()), "showcase": list(showcase),
                       "budget": int(budget_bytes)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def query_stride(grid: tuple[int, int], layers: int, heads: int, budget_bytes: int) -> int:
    """The smallest stride whose query sub-grid's rows (``layers x heads x queries x patches`` bytes) fit."""
    h, w = grid
    per_query = layers * heads * h * w
    for s in range(1, max(h, w) + 1):
        if math.ceil(h / s) * math.ceil(w / s) * per_query <= budget_bytes:
            return s
    return max(h, w)


def decode(codes: np.ndarray) -> np.ndarray:
    """Attention probabilities from stored codes: ``(code / LEVELS) ** 2`` (float64).

    >>> decode(np.array([0, 4, 63], np.uint8)).round(5).tolist()
    [0.0, 0.00403, 1.0]
    """
    return (np.asarray(codes, dtype=np.float64) / LEVELS) ** 2


def _code(p: torch.Tensor) -> np.ndarray:
    """uint8 codes of probabilities (any shape); a value that is not finite (a diverged model's NaN
    attention) is 0, which a cast to uint8 would leave undefined."""
    import torch

    q = torch.nan_to_num(p.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(0.0, 1.0)
    return q.sqrt_().mul_(LEVELS).add_(0.5).to(torch.uint8).cpu().numpy()  # + 0.5, truncated: rounded


def _background(x) -> bytes:
    """The model's own preprocessed input as a JPEG: the view the maps figure draws too
    (:func:`probekit.inputs.view.rgb`, each channel stretched back to 0..255)."""
    from PIL import Image

    from probekit.inputs.view import rgb

    buf = io.BytesIO()
    Image.fromarray(rgb(x)).save(buf, format="JPEG", quality=85)  # x: [C, H, W]
    return buf.getvalue()


def _spans(positions: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive batch positions as ``(start, stop)``: ``[0, 1, 2, 5] -> [(0, 3), (5, 6)]``."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


class Recorder:
    """Reads the showcase images' layers in a forward pass (an observer of the engine's
    :class:`~probekit.engine.sink.MetricSink`, see :class:`~probekit.engine.sink.LayerObserver`).

    Per batch that holds showcase images, each layer's probabilities of those images only are
    computed once (float32), coded and kept (all queries, or the budget's sub-grid); the rollout
    runs over the same layers. A failure is kept in :attr:`error`, never raised into the probe:
    the explorer is a view and never costs the numbers.

    Args:
        positions: index of each showcase image in the image set the forward pass goes over.
        names: the showcase images' names (in the same order).
        layers, heads: the model's (they size the query sub-grid with ``budget_bytes``).
        budget_bytes: bytes of query rows stored per model, over all showcase images.
    """

    def __init__(self, positions: Sequence[int], names: Sequence[str], layers: int, heads: int, budget_bytes: int):
        self.slot = {int(p): k for k, p in enumerate(positions)}  # image index -> showcase index
        self.names = list(names)
        self.layers, self.heads = int(layers), int(heads)
        self.budget = max(1, int(budget_bytes) // max(1, len(self.names)))
        self.error: Exception | None = None
        self.seconds = 0.0  # time spent here (inside the probe's forward passes)
        self.query: str | None = None
        self.queries: np.ndarray | None = None
        self.grid: tuple[int, int] | None = None
        self.patch: tuple[int, int] | None = None
        self._rows: dict[int, dict[int, np.ndarray]] = {}  # showcase index -> layer -> [H, Q, N]
        self._cls: dict[int, dict[int, np.ndarray]] = {}  # showcase index -> layer -> [H, N]
        self._roll: dict[int, np.ndarray] = {}  # showcase index -> [L, N]
        self._bg: dict[int, bytes] = {}
        self._here: list[tuple[int, int]] = []  # this batch: (batch position, showcase index)
        self._rollout: Any = None

    def _guarded(self, step, *args) -> None:
        if self.error is not None:
            return
        t0 = time.perf_counter()
        try:
            step(*args)
        except Exception as exc:  # kept for the run's notes; the probe goes on
            self.error, self._here = exc, []
        finally:
            self.seconds += time.perf_counter() - t0

    # -- the observer's three calls ---------------------------------------------------------------
    def start(self, images: Any, pixels: torch.Tensor | None, layout: Any) -> None:
        """A batch begins: ``images`` are its indices into the image set, ``pixels`` its input."""
        self._here = []
        self._guarded(self._start, images, pixels, layout)

    def attention(self, layer: int, attn: Any, layout: Any) -> None:
        """One layer of the batch (before the metrics reduce it)."""
        if self._here:
            self._guarded(self._attention, layer, attn, layout)

    def finish(self) -> None:
        """The batch's forward pass is done."""
        if self._here:
            self._guarded(self._finish)
        self._here = []

    # -- the work ----------------------------------------------------------------------------
    def _start(self, images: Any, pixels: torch.Tensor | None, layout: Any) -> None:
        here = [(j, self.slot[int(i)]) for j, i in enumerate(images) if int(i) in self.slot]
        if not here or pixels is None:
            return
        from probekit.registry import metrics

        h, w = layout.grid
        if self.grid is None:
            stride = query_stride((h, w), self.layers, self.heads, self.budget)
            ys = np.arange(((h - 1) % stride) // 2, h, stride)
            xs = np.arange(((w - 1) % stride) // 2, w, stride)
            self.queries = (ys[:, None] * w + xs[None, :]).ravel().astype(np.int32)
            self.grid, self.patch = (h, w), tuple(layout.patch_size)
            self.query = "cls" if "cls" in layout.prefix_kinds else "mean"
        elif (h, w) != self.grid:
            name = self.names[here[0][1]]
            raise ValueError(f"showcase image {name} gives a {h}x{w} grid, the first {self.grid[0]}x{self.grid[1]}")
        for j, k in here:
            self._bg[k] = _background(pixels[j])
            self._rows[k], self._cls[k] = {}, {}
        self._rollout = metrics.get("rollout")(query=self.query)  # a fresh one per batch
        self._here = here

    def _attention(self, layer: int, attn: Any, layout: Any) -> None:
        import torch

        from probekit.attention import LayerAttention
        from probekit.tokens import TokenLayout

        if not isinstance(layout, TokenLayout):
            raise ValueError(f"layer {layer} is windowed, pooled or staged: the explorer draws global attention only")
        assert self.queries is not None
        n = layout.num_prefix
        every = len(self.queries) == layout.num_patches  # all queries: a view of the rows, no gather
        q = slice(n, None) if every else torch.as_tensor(self.queries, dtype=torch.long, device=attn.device) + n
        parts = []
        for lo, hi in _spans([j for j, _ in self._here]):
            _, p = attn.block(batch=slice(lo, hi))  # [b, H, T, T] float32, these images only
            parts.append(p)
        probs = parts[0] if len(parts) == 1 else torch.cat(parts)
        rows = _code(probs[:, :, q, n:])  # [b, H, Q, N]
        if self.query == "cls":
            cls = _code(probs[:, :, layout.prefix_kinds.index("cls"), n:])
        else:
            cls = _code(probs[:, :, n:, n:].mean(2))
        for i, (_, k) in enumerate(self._here):
            self._rows[k][layer], self._cls[k][layer] = rows[i], cls[i]
        self._rollout.on_attention(layer, LayerAttention(probs_given=probs), layout)

    def _finish(self) -> None:
        import torch

        maps = self._rollout.on_batch_end()
        layers = sorted(maps)
        self._rollout = None
        for i, (_, k) in enumerate(self._here):
            if sorted(self._rows[k]) != layers:
                raise ValueError(f"the explorer saw layers {sorted(self._rows[k])} of {self.names[k]}, the rollout "
                                 f"{layers}")
            self._roll[k] = _code(torch.stack([maps[layer][i].reshape(-1) for layer in layers]))

    # -- the result --------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray] | None:
        """The arrays :func:`save` writes, or None until every showcase image was seen (or on error).

        ``attn [I, L, H, Q, N]``, ``cls [I, L, H, N]``, ``rollout [I, L, N]`` (uint8 codes),
        ``queries [Q]`` (patch indices), ``grid``, ``patch``, ``names``, ``query`` ("cls" or
        "mean") and ``bg<i>`` (JPEG bytes per image).
        """
        if self.error is not None or len(self._roll) < len(self.names):
            return None
        assert self.queries is not None and self.grid is not None and self.patch is not None
        idx = range(len(self.names))
        out: dict[str, np.ndarray] = {
            "attn": np.stack([np.stack([self._rows[k][la] for la in sorted(self._rows[k])]) for k in idx]),
            "cls": np.stack([np.stack([self._cls[k][la] for la in sorted(self._cls[k])]) for k in idx]),
            "rollout": np.stack([self._roll[k] for k in idx]),
            "queries": self.queries, "grid": np.array(self.grid, np.int32), "patch": np.array(self.patch, np.int32),
            "names": np.array(self.names), "query": np.array(self.query)}
        for k in idx:
            out[f"bg{k}"] = np.frombuffer(self._bg[k], dtype=np.uint8)
        return out


def capture(pm: Any, images: Any, budget_bytes: int) -> dict[str, np.ndarray]:
    """Explorer arrays for ``images`` (an :class:`~probekit.inputs.images.ImageSet`) on a loaded model,
    from forward passes of their own (a run that probes the model records them in its pass instead).

    Returns:
        :meth:`Recorder.arrays`.

    Raises:
        whatever stopped the recording (a windowed model, images of different grids, ...).
    """
    import torch

    from probekit.engine.sink import MetricSink
    from probekit.inputs.images import collate

    rec = Recorder(range(len(images)), images.names, pm.num_layers, pm.num_heads, budget_bytes)
    ds = images.dataset(pm.preprocess, channels=pm.adapter.in_chans)
    sink = MetricSink([], observer=rec)
    with torch.inference_mode(), pm.adapter.evaluating(), pm.adapter.tap(sink):
        for a in range(0, len(images), _CHUNK):
            idx, x = collate([ds[i] for i in range(a, min(a + _CHUNK, len(images)))])
            if x is None:
                continue
            x = x.to(pm.device)
            sink.start(pm.layout(x), pm.geometry(x), batch=(idx, x))
            pm.adapter.forward(x)
            sink.finish()
    got = rec.arrays()
    if rec.error is not None:
        raise rec.error
    if got is None:
        missing = [n for k, n in enumerate(images.names) if k not in rec._roll]
        raise ValueError(f"showcase image(s) could not be read: {', '.join(missing)}")
    return got


class ExplorerJob:
    """One model's explorer arrays for a run: recorded in its probing pass, else captured alone;
    a failure becomes a note of the run (the explorer is a view: it never costs the numbers)."""

    def __init__(self, path: Path, showcase: Any, budget_bytes: int, mrec: ModelRecord, record: RunRecord):
        self.path, self.showcase, self.budget, self.mrec, self.record = path, showcase, budget_bytes, mrec, record

    def recorder(self, pm: Any, images: Any) -> Recorder | None:
        """An observer for the probing pass over ``images`` (None if a showcase image is not among them)."""
        where = {n: i for i, n in enumerate(images.names)}
        if any(n not in where for n in self.showcase.names):
            return None
        return Recorder([where[n] for n in self.showcase.names], self.showcase.names, pm.num_layers, pm.num_heads,
                        self.budget)

    def finish(self, pm: Any, rec: Recorder | None) -> None:
        """Save what ``rec`` recorded (or capture it now, when it saw nothing or not every image)."""
        try:
            if rec is not None and rec.error is not None:
                raise rec.error
            arrays = rec.arrays() if rec is not None else None
            save(self.path, arrays if arrays is not None else capture(pm, self.showcase, self.budget))
        except Exception as exc:
            self.mrec.explorer = None
            self.record.add_notes([f"{self.mrec.label}: no attention explorer ({type(exc).__name__}: {exc})"],
                                  report=True)


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from probekit._io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        # uint8 codes: the report compresses them once for all models. numpy's stubs let **arrays fill
        # allow_pickle (a bool); the keys are Recorder.arrays()'
        np.savez(tmp, **arrays)  # type: ignore[arg-type]


def load(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when missing, damaged or not what :func:`capture` writes (then
    they are captured again). Plain arrays only: an object array (a pickle) is refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:
        return None
    return arrays if _as_captured(arrays) else None


def _as_captured(a: dict[str, np.ndarray]) -> bool:
    """Whether ``a`` has the keys, dtypes and shapes :func:`capture` gives (not a planted file's)."""
    kinds = {"attn": "u1", "cls": "u1", "rollout": "u1", "queries": "i", "grid": "i", "patch": "i", "names": "U",
             "query": "U"}
    if any(k not in a or (a[k].dtype.kind if len(t) == 1 else a[k].dtype.str[1:]) != t for k, t in kinds.items()):
        return False
    n = len(a["names"]) if a["names"].ndim == 1 else -1
    if not (a["grid"].shape == a["patch"].shape == (2,) and a["query"].ndim == 0 and a["attn"].ndim == 5
            and a["cls"].ndim == 4 and a["rollout"].ndim == 3 and a["queries"].ndim == 1):
        return False
    i, nl, nh, nq, npatch = a["attn"].shape
    h, w = (int(v) for v in a["grid"])
    return (i == n and nq == len(a["queries"]) and npatch == h * w and a["cls"].shape == (n, nl, nh, npatch)
            and a["rollout"].shape == (n, nl, npatch) and bool(((a["queries"] >= 0) & (a["queries"] < h * w)).all())
            and all(f"bg{k}" in a and a[f"bg{k}"].dtype == np.uint8 for k in range(n)))
