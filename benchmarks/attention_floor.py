"""What one tapped layer costs next to the model's own SDPA, piece by piece (issue 12's floor).

    python benchmarks/attention_floor.py                    # DINOv2-S/14 at 518: 2 images, 6 heads, 1370 tokens
    python benchmarks/attention_floor.py --tokens 785 --heads 12 --batch 4

Per layer, best of 7, wall time with ``--threads`` torch threads:

- ``sdpa``: ``F.scaled_dot_product_attention`` (the plain forward's attention: flash, fused);
- ``q·kᵀ + softmax + P·V``: the blocked one-pass path without any metric, in the engine's blocks of
  every image (``--block-mb``, default the engine's 8 MiB) and in blocks of one image's rows;
- ``sink: ...``: :class:`probekit.engine.sink.MetricSink` with ``attention_pass="fused"`` and the metrics,
  i.e. what a tapped layer costs in ``pk.probe``.

The difference to ``sdpa``, times the layers, over the plain forward's time is what the layer adds
to ``benchmarks/bench_probe.py``'s ratio. Random q, k, v (no model), so it runs in seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import probekit as pk
from probekit.attention import LayerAttention
from probekit.engine.sink import MetricSink


def _best(fn, n: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _blocked(q, kt, v, rows: int, per_image: bool):
    b, h, t, d = q.shape
    n_img = 1 if per_image else b
    s = torch.empty(n_img * h * rows * t)
    p = torch.empty_like(s)
    o = torch.empty(n_img * h * rows * d)

    def run():
        for i in range(0, b, n_img):
            for r in range(0, t, rows):
                n = min(rows, t - r)
                zs, ps = s[: n_img * h * n * t].view(n_img, h, n, t), p[: n_img * h * n * t].view(n_img, h, n, t)
                torch.matmul(q[i : i + n_img, :, r : r + n], kt[i : i + n_img], out=zs)
                torch.ops.aten._softmax.out(zs, -1, False, out=ps)
                torch.matmul(ps, v[i : i + n_img], out=o[: n_img * h * n * d].view(n_img, h, n, d))

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1370)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-mb", type=float, default=8.0)
    ap.add_argument("--json", help="also write the table to this results file (benchmarks/results/*.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    b, h, t, d = args.batch, args.heads, args.tokens, 64
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, t, 3, h, d, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as a model's fused qkv projection gives
    side = int(round((t - 1) ** 0.5))
    lay = pk.TokenLayout(num_prefix=t - side * side, grid=(side, side), patch_size=(14, 14))
    qs, kt, vf = (q * d**-0.5).contiguous(), k.transpose(-1, -2).contiguous(), v.contiguous()
    per_row = b * h * t * 4 * 2
    rows_all = max(1, min(t, int(args.block_mb * 2**20) // per_row))
    print(f"{b} images x {h} heads x {t} tokens, {args.threads} threads, ms per layer (best of 7)")
    timed = []  # (piece, ms)

    def show(piece: str, ms: float) -> None:
        timed.append((piece, ms))
        print(f"  {piece:60s} {ms:6.1f}")

    with torch.inference_mode():
        show("sdpa", _best(lambda: F.scaled_dot_product_attention(q, k, v)))
        show(f"q·kᵀ + softmax + P·V, blocks of every image ({rows_all} rows)",
             _best(_blocked(qs, kt, vf, rows_all, per_image=False)))
        for rows in (128, 256):
            show(f"q·kᵀ + softmax + P·V, blocks of one image ({rows} rows)",
                 _best(_blocked(qs, kt, vf, rows, per_image=True)))
        for names in (["mad"], ["entropy"], ["mad", "entropy"]):
            sink = MetricSink([pk.metrics.get(n)() for n in names], attention_pass="fused", block_mb=args.block_mb)
            sink.start(lay)
            show(f"sink: {' + '.join(names)}",
                 _best(lambda: sink.attention(0, LayerAttention(q=q, k=k, v=v, scale=d**-0.5))))
    if args.json:
        from _record import write

        col = f"piece ({t} tokens, {b} images, {h} heads)"
        write(args.json, "One layer piece by piece (attention_floor.py)", [col, "ms per layer"],
              [{col: piece, "ms per layer": round(ms, 2)} for piece, ms in timed],
              notes=[f"{args.threads} torch threads, block_mb={args.block_mb}, best of 7"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
