"""Where probekit's overhead goes: torch.profiler on ``pk.probe`` (ViT-B/16 224, batch 16 by default).

    python benchmarks/profile_probe.py                       # MAD + entropy, batch 16
    python benchmarks/profile_probe.py --metrics mad --batch 8

The run is split into three regions, marked with ``record_function`` from the outside (the
engine itself carries no profiling code): the model's forward pass without the sink, the sink
(everything the engine does per layer, inside the forward), and what ``pk.probe`` does around
the forward (image set, DataLoader, table). Inside the sink, ops are listed by self time; the
sink's time not spent in any op is Python (hooks, slicing, dict bookkeeping).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import probekit as pk

probe_module = importlib.import_module("probekit.engine.probe")  # the package re-exports the function under the same name


def _marked(method, label):
    def wrapped(self, *args, **kwargs):
        with record_function(label):
            return method(self, *args, **kwargs)

    return wrapped


def _in_region(evt, name) -> bool:
    while evt is not None:
        if evt.name == name:
            return True
        evt = evt.cpu_parent
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--metrics", default="mad,entropy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--attention-pass", default="auto", help="auto, fused, separate (see pk.probe)")
    ap.add_argument("--block-mb", type=float, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pm = pk.load(args.model, pretrained=False, image_size=args.image_size)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    metrics = [m for m in args.metrics.split(",") if m]

    sink_cls = probe_module.MetricSink
    sink_cls.attention = _marked(sink_cls.attention, "probekit.engine.sink")
    adapter_cls = type(pm.adapter)
    adapter_cls.forward = _marked(adapter_cls.forward, "model.forward")

    with torch.inference_mode():
        pm.model(x)  # warm-up
        t = time.perf_counter()
        pm.model(x)
        plain_s = time.perf_counter() - t
    pk.probe(pm, x, metrics=metrics, batch_size=args.batch, attention_pass=args.attention_pass,
                     block_mb=args.block_mb)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("probekit.engine.probe"):
            t = time.perf_counter()
            pk.probe(pm, x, metrics=metrics, batch_size=args.batch, attention_pass=args.attention_pass,
                     block_mb=args.block_mb)
            probe_s = time.perf_counter() - t

    events = prof.events()
    total = {e.name: 0.0 for e in events if e.name in ("probekit.engine.probe", "model.forward", "probekit.engine.sink")}
    for e in events:
        if e.name in total:
            total[e.name] += e.cpu_time_total / 1e6
    ops = defaultdict(float)
    for e in events:
        if e.name not in total and _in_region(e.cpu_parent, "probekit.engine.sink"):
            ops[e.name] += e.self_cpu_time_total / 1e6
    sink_s, fwd_s, all_s = total.get("probekit.engine.sink", 0), total.get("model.forward", 0), total["probekit.engine.probe"]
    if not sink_s:
        print("The sink never ran: does this adapter's tap call MetricSink.attention?", file=sys.stderr)

    print(f"{args.model} {args.image_size}px, batch {args.batch}, metrics {metrics}, {args.threads} threads")
    print(f"plain forward (no profiler)      {plain_s:7.3f} s")
    print(f"pk.probe (under the profiler)    {probe_s:7.3f} s  ({probe_s / plain_s:.2f}x plain; the profiler adds a little)")
    print(f"  model forward without the sink {fwd_s - sink_s:7.3f} s")
    print(f"  sink (per-layer engine work)   {sink_s:7.3f} s  {100 * sink_s / all_s:5.1f}%")
    print(f"  around the forward             {all_s - fwd_s:7.3f} s  {100 * (all_s - fwd_s) / all_s:5.1f}%  "
          "(image set, DataLoader, table)")
    print("inside the sink, by op (self time):")
    for name, s in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {name:<36} {s:7.3f} s  {100 * s / max(sink_s, 1e-9):5.1f}% of sink")
    print(f"  {'Python (no op)':<36} {sink_s - sum(ops.values()):7.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
