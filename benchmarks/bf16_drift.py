"""How far MAD under ``dtype="bf16"`` lies from a float32 run, per head (the README's figure).

Under bf16 autocast the model computes q and k in bf16 before probekit's float32 softmax, so
heads whose logits are large (sharp heads) move. This builds timm's ViT-S/16 at random init,
adds seeded noise (``randomize_parameters``) so heads are sharp, probes the bundled sample
photos once in float32 and once under bf16 autocast, and prints the relative MAD difference
per (layer, head): its maximum, 99th percentile and median, and the sharpest head's.

    python benchmarks/bf16_drift.py [--scale 0.3] [--model vit_small_patch16_224]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import probekit as pk
from probekit.testing import randomize_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--scale", type=float, default=0.3, help="noise added to every parameter (randomize_parameters)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this results file (benchmarks/results/*.json)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    pm = pk.load(f"timm:{args.model}", pretrained=False)
    randomize_parameters(pm.model, seed=args.seed, scale=args.scale)
    runs = {}
    for dtype in ("float32", "bf16"):
        res = pk.probe(pm, "sample", metrics=["mad"], batch_size=6, dtype=dtype)
        runs[dtype] = res.table.groupby(["layer", "head"])["value"].mean()
    f32, b16 = runs["float32"], runs["bf16"]
    rel = ((b16 - f32).abs() / f32).to_numpy()
    worst = int(np.argmax(rel))
    layer, head = f32.index[worst]
    print(f"timm:{args.model}, random init + randomize_parameters(scale={args.scale}, seed={args.seed}), "
          f"6 sample images, {len(rel)} heads")
    print(f"relative MAD difference bf16 vs float32: max {rel.max():.1%} (layer {layer}, head {head}: "
          f"{f32.iloc[worst]:.2f} px -> {b16.iloc[worst]:.2f} px), p99 {np.quantile(rel, 0.99):.1%}, "
          f"median {np.median(rel):.2%}")
    sharp = int(np.argmin(f32.to_numpy()))
    print(f"sharpest head (lowest float32 MAD, layer {f32.index[sharp][0]} head {f32.index[sharp][1]}): "
          f"{f32.iloc[sharp]:.2f} px -> {b16.iloc[sharp]:.2f} px ({rel[sharp]:.1%})")
    if args.json:
        from _record import write

        cols = ["model", "max relative difference", "median over heads", "worst head"]
        write(args.json, "MAD under bf16 autocast against float32 (bf16_drift.py)", cols, [{
            "model": f"timm {args.model}, random init + randomize_parameters(scale={args.scale}), the sample photos",
            "max relative difference": f"{rel.max():.1%}", "median over heads": f"{np.median(rel):.1%} ({len(rel)} heads)",
            "worst head": f"layer {layer}, head {head}: {f32.iloc[worst]:.1f} px -> {b16.iloc[worst]:.1f} px"}])


if __name__ == "__main__":
    main()
