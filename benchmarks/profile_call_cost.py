"""Where a small probe call's time goes, in situ: timm ViT-S/16 at 224 px, MAD, batch 1 (issue 25).

    python benchmarks/profile_call_cost.py                  # batch 1, 1 torch thread
    python benchmarks/profile_call_cost.py --batch 4 --threads 2

benchmarks/bench_call_cost.py says how a call compares with the plain forward and with timm's
AttentionExtract; this says where the difference comes from, in three parts:

1. The call step by step: the plain forward; the same under the tap with a sink that does nothing
   (hooks and the SDPA spy); with the engine's sink (the layers' work), run to the end and stopped
   after the last layer; ``pk.probe`` whole (``stop_early=False``) and as shipped. Wall time, medians
   over paired order-alternating rounds, and each step's median paired difference to the plain forward.
2. One layer in situ, inside those forwards: torch's SDPA in the plain forward, the C kernel's call
   and the sink's whole ``attention`` around it (timers wrapped around each; the Python between them
   runs with caches cold after the model's matrix products, which makes it several times slower
   than the same code timed in a loop).
3. What a call does around the forward, piece by piece (thread CPU time, medians of 30).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import probekit as pk
from probekit.adapter import eval_mode
from probekit.engine import probe as engine
from probekit.engine.kernels import cpu
from probekit.engine.sink import ForwardDone, MetricSink
from probekit.inputs.images import resolve_images

med = statistics.median


class _NoSink:
    """A sink that asks for every layer and does nothing with it: the tap's own cost."""

    layers, wants_attention, wants_hidden = None, True, False

    def attention(self, layer, attn):
        return None


def _steps(pm, x, batch: int) -> dict:
    mets = engine.build_metrics(["mad"])

    def plain():
        with torch.inference_mode():
            pm.model(x)

    def no_sink():
        with torch.inference_mode(), pm.adapter.tap(_NoSink()):
            pm.adapter.forward(x)

    def sink(stop: bool):
        def run():
            s = MetricSink(mets, stop_early=stop)
            with torch.inference_mode(), pm.adapter.tap(s):
                s.start(pm.layout(x), pm.geometry(x))
                try:
                    pm.adapter.forward(x)
                except ForwardDone:
                    pass
                s.finish()
        return run

    return {"plain forward": plain, "forward, tap with a sink doing nothing": no_sink,
            "forward + the engine's sink, whole forward": sink(False),
            "forward + the engine's sink, stopped after the last layer": sink(True),
            "pk.probe(stop_early=False)": lambda: pk.probe(pm, x, metrics=["mad"], batch_size=batch, stop_early=False),
            "pk.probe (as shipped)": lambda: pk.probe(pm, x, metrics=["mad"], batch_size=batch)}


def _timed(steps: dict, rounds: int) -> dict[str, list[float]]:
    for f in steps.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    return times


class _Clocks:
    """Timers around torch's SDPA, the C kernel's call and MetricSink.attention, for one step at a time."""

    def __init__(self):
        self.spent: dict[str, list[float]] = {}
        self._saved = []

    def wrap(self, owner, name: str, label: str):
        f = getattr(owner, name)
        spent = self.spent.setdefault(label, [])

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t)

        self._saved.append((owner, name, f))
        setattr(owner, name, timed)

    def restore(self):
        for owner, name, f in reversed(self._saved):
            setattr(owner, name, f)


def _per_layer(steps: dict, rounds: int) -> dict[str, float]:
    from probekit.plugins.adapters import _sdpa_spy

    clocks = _Clocks()
    # the spy calls the original through its module global; timm's plain forward calls F's attribute
    clocks.wrap(F, "scaled_dot_product_attention", "torch SDPA, in the plain forward")
    clocks.wrap(cpu.AttentionCall, "__call__", "the C kernel's call (pk_attention), in probekit's forward")
    clocks.wrap(MetricSink, "attention", "MetricSink.attention (kernel included)")
    saved_spy = _sdpa_spy._ORIGINAL_SDPA
    _sdpa_spy._ORIGINAL_SDPA = F.scaled_dot_product_attention
    try:
        for _ in range(rounds):
            steps["plain forward"]()
            steps["forward + the engine's sink, whole forward"]()
    finally:
        _sdpa_spy._ORIGINAL_SDPA = saved_spy
        clocks.restore()
    return {k: med(v) for k, v in clocks.spent.items() if v}


def _around(pm, x, batch: int) -> dict[str, float]:
    plan = engine._resolve(pm, x, ["mad"], None, None, None, False, None)
    pk.probe(pm, x, metrics=plan.metrics, batch_size=batch)  # fills the metrics' state for _to_table
    sink = MetricSink(plan.metrics)

    def batches():
        for _ in engine._loader(pm, plan.images, batch, 0, False):
            pass

    def modes():
        with eval_mode(pm.model):
            pass

    def tap():
        with pm.adapter.tap(sink):
            pass

    pieces = {
        "argument checks": lambda: engine.check_probe_arguments(
            model=pm, metrics=["mad"], batch_size=batch, layers=None, device=None, num_workers=0, block_mb=None),
        "resolve (metrics built, images listed)": lambda: engine._resolve(pm, x, ["mad"], None, None, None, False,
                                                                          None),
        "the tensor's batches": batches,
        "eval mode (modes saved, set, given back)": modes,
        "tap on and off (hooks, SDPA spy)": tap,
        "layout + geometry + sink.start": lambda: sink.start(pm.layout(x), pm.geometry(x)),
        "image fingerprint (SHA-256 of the tensor)": lambda: resolve_images(x).fingerprint(),
        "the long table from the metrics' state": lambda: engine._to_table(plan.name, plan.images.names,
                                                                          plan.metrics),
        "run record (provenance; fingerprint cached)": lambda: engine._provenance(plan, pm.layout(x), batch, 1.0,
                                                                                 pm.geometry(x)),
    }
    out = {}
    for k, f in pieces.items():
        for _ in range(3):
            f()
        ts = []
        for _ in range(30):
            t = time.thread_time()
            f()
            ts.append(time.thread_time() - t)
        out[k] = med(ts)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pm = pk.load("timm:vit_small_patch16_224", pretrained=False)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"timm vit_small_patch16_224, 224 px, batch {args.batch}, MAD on 12 layers x 6 heads, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} paired rounds")

    steps = _steps(pm, x, args.batch)
    times = _timed(steps, args.rounds)
    plain = times["plain forward"]
    print("\n1. The call, step by step (wall time; extra: median of paired differences to the plain forward)")
    for k, ts in times.items():
        extra = med([a - b for a, b in zip(ts, plain, strict=True)])
        print(f"  {k:58s} {med(ts) * 1e3:8.2f} ms  extra {extra * 1e3:6.2f} ms ({extra / med(plain) * 100:5.1f}%)")

    print("\n2. One layer in situ (median over every layer of the rounds)")
    for k, v in _per_layer(steps, max(10, args.rounds // 3)).items():
        print(f"  {k:58s} {v * 1e3:8.3f} ms")

    print("\n3. Around the forward, piece by piece (thread CPU time, median of 30)")
    pieces = _around(pm, x, args.batch)
    for k, v in pieces.items():
        print(f"  {k:58s} {v * 1e3:8.3f} ms")
    print(f"  {'sum':58s} {sum(pieces.values()) * 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
