"""What every adapter check runs on: the adapter behind a model, a seeded input, a tapped forward
whose own work a :class:`~probekit.testing.capture.ModelCalls` capture does not see, and the
words for a model that fails at a size other than its native one."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from probekit.adapter import Adapter, CollectSink, ProbedModel
from probekit.testing.capture import ModelCalls
from probekit.testing.records import SkipCheck

__all__ = ["adapter_of", "kit_input", "tapped", "sized"]


def adapter_of(pm: ProbedModel | Adapter) -> Adapter:
    return pm.adapter if isinstance(pm, ProbedModel) else pm


def kit_input(pm, batch: int = 2, image_size=None, seed: int = 0) -> torch.Tensor:
    ad = adapter_of(pm)
    h, w = image_size or ad.default_image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, getattr(ad, "in_chans", 3), h, w, generator=g).to(ad.device)


class _KitSink(CollectSink):
    """A CollectSink whose own work (probabilities, clones) is hidden from a ModelCalls capture,
    and that keeps each layer's float32 rounding scale ``scale * max|q| * max|k|`` (``rounding``).

    Why the rounding scale: a float32 logit ``q . k * scale`` is exact only to about eps times
    ``sum |q_i k_i| <= |q| |k|``, and a probability moves by at most its logit's error. Two correct
    float32 paths (a fused kernel, an eager matmul) differ by that much, which on wide randomized
    models (logits of several hundred) exceeds a fixed 1e-5 at any depth.
    """

    def __init__(self, calls: ModelCalls | None, *args, **kw):
        super().__init__(*args, **kw)
        self._calls = calls
        self.rounding: dict[int, float] = {}
        self.reported_at: dict[int, int] = {}  # layer -> the model's norm calls made before the tap reported it

    def attention(self, layer, attn):
        if self._calls is not None:
            self.reported_at[layer] = self._calls.norm_count
        with self._calls.paused() if self._calls else contextlib.nullcontext():
            super().attention(layer, attn)
            if attn.q is not None:
                qn, kn = attn.q.float().norm(dim=-1).amax(), attn.k.float().norm(dim=-1).amax()
                self.rounding[layer] = float(attn.scale * qn * kn) * torch.finfo(torch.float32).eps

    def hidden(self, layer, tokens, layout=None):
        with self._calls.paused() if self._calls else contextlib.nullcontext():
            super().hidden(layer, tokens, layout)


@torch.inference_mode()
def tapped(ad: Adapter, x: torch.Tensor, layers=None, hidden: bool = False, calls: ModelCalls | None = None,
           sink: CollectSink | None = None, attention: bool | None = None):
    """``(sink, output)`` of one forward under the tap: attention (default: unless ``hidden``), hidden states."""
    sink = sink or _KitSink(calls, layers, attention=not hidden if attention is None else attention, hidden=hidden)
    with ad.tap(sink):
        out = ad.forward(x)
    return sink, out


def sized(check: Callable) -> Callable:
    """A check at ``image_size=``: an error of the model at a non-native size says what to set.

    Why: an adapter inherits ``variable_image_size = True``; a model with a fixed position table
    then fails the non-native variants with its own shape error, which names nothing to change.
    """

    @functools.wraps(check)
    def run(name: str, pm, *args, image_size=None, **kw):
        try:
            return check(name, pm, *args, image_size=image_size, **kw)
        except (AssertionError, SkipCheck):
            raise
        except Exception as exc:
            ad = adapter_of(pm)
            if image_size is None or tuple(image_size) == tuple(ad.default_image_size):
                raise
            (h, w), (nh, nw) = image_size, ad.default_image_size
            raise AssertionError(
                f"{name}: the model fails on a {h}x{w} input (its native size is {nh}x{nw}): "
                f"{type(exc).__name__}: {exc}. If it runs only its native size (a fixed position table or "
                f"graph input), set variable_image_size = False on {type(ad).__name__} (or on the instance)."
            ) from exc

    return run
