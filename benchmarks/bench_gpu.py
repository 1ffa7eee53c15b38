"""What probing costs on a GPU, against the plain bf16 forward (flash SDPA).

    python benchmarks/bench_gpu.py              # CUDA: ViT-B/16 224 and 448, ViT-L/14 518, batch 64
    python benchmarks/bench_gpu.py --dry-run    # any machine: tiny models on CPU, same code paths

Each row is one way of running ``pk.probe(metrics=["mad", "entropy"])`` under bf16 autocast,
timed against the model's own forward under the same autocast (torch's flash/efficient SDPA):

- ``kernel``    ``attention_pass="kernel"``: the fused Triton kernel gives each layer's output
                and the metric row sums in one pass, never writing ``[T, T]`` (probekit.engine.kernels.triton);
- ``fused``     ``attention_pass="fused"``: the blocked PyTorch one pass (probabilities in blocks
                of query rows, output ``P_block @ V``);
- ``separate``  ``attention_pass="separate"``: the model's SDPA, then the blocks recomputed.

Time: best of ``--reps`` runs after a warm-up, CUDA-synchronized, plain and method alternating.
Memory: ``torch.cuda.max_memory_allocated`` over a plain run and over a method run; ``extra``
is the difference. Goal (issue 12): ``kernel`` <= 1.05x plain at every length.

``--dry-run`` sets ``TRITON_INTERPRET=1`` (before triton is imported), shrinks every model to
one narrow layer and a few tokens and runs on CPU: the same calls, the Triton kernel under
Triton's interpreter; the timings then mean nothing, the run only proves the script works.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

CASES = {
    # name: timm architecture, image size, label
    "vit-b16-224": ("vit_base_patch16_224", 224, "ViT-B/16 224"),
    "vit-b16-448": ("vit_base_patch16_224", 448, "ViT-B/16 448"),
    "vit-l14-518": ("vit_large_patch14_dinov2", 518, "ViT-L/14 518"),
}
METHODS = ("kernel", "fused", "separate")
TINY = dict(embed_dim=32, depth=1, num_heads=2)  # --dry-run: one narrow layer per model


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def measure(case: str, methods, batch: int, reps: int, dry: bool, device) -> list[dict]:
    """One case: the plain forward and each method, alternating; best times and peak memory."""
    import torch

    import probekit as pk

    arch, size, _ = CASES[case]
    if dry:  # a few tokens per case, growing like the real ones
        size = {"vit-b16-224": 32, "vit-b16-448": 48, "vit-l14-518": 64}[case]
    opts = dict(TINY, patch_size=16, img_size=size) if dry else {}
    torch.manual_seed(0)
    pm = pk.load(f"timm:{arch}", pretrained=False, image_size=size, **opts).to(device)
    x = torch.randn(batch, 3, size, size, device=device)

    def plain():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            pm.model(x)

    def method(mode):
        return lambda: pk.probe(pm, x, metrics=["mad", "entropy"], batch_size=batch, dtype="bf16",
                                attention_pass=mode)

    runs = {m: method(m) for m in methods}
    plain()
    for fn in runs.values():
        fn()  # warm-up: kernel compilation, allocator
    _peak_reset(device)
    t_plain = [_timed(plain, device)]
    plain_peak = _peak_mb(device)
    rows = []
    for name, fn in runs.items():
        _peak_reset(device)
        times = []
        for _ in range(reps):
            times.append(_timed(fn, device))
            t_plain.append(_timed(plain, device))
        rows.append({"case": case, "method": name, "t": min(times), "peak_mb": _peak_mb(device)})
    for r in rows:
        r.update(batch=batch, tokens=pm.layout(x).num_tokens, t_plain=min(t_plain), plain_peak_mb=plain_peak)
    return rows


def print_table(rows: list[dict], dry: bool) -> None:
    head = f"{'case':<26} {'method':<9} {'batch':>5} {'img/s':>8} {'x plain':>8} {'peak MB':>9} {'extra MB':>9}"
    print(head)
    print("-" * len(head))
    for case in CASES:
        part = [r for r in rows if r["case"] == case]
        if not part:
            continue
        p = part[0]
        label = f"{CASES[case][2]} ({p['tokens']} tok)"
        print(f"{label:<26} {'plain':<9} {p['batch']:>5} {p['batch'] / p['t_plain']:>8.1f} {1:>8.2f} "
              f"{p['plain_peak_mb']:>9.0f} {0:>9.0f}")
        for r in part:
            print(f"{'':<26} {r['method']:<9} {r['batch']:>5} {r['batch'] / r['t']:>8.1f} {r['t'] / r['t_plain']:>8.2f} "
                  f"{r['peak_mb']:>9.0f} {r['peak_mb'] - r['plain_peak_mb']:>9.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny models on CPU, the kernel under Triton's interpreter")
    ap.add_argument("--batch", type=int, default=None, help="images per forward (default 64; dry run 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per method (default 5; dry run 1)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--json", help="also write the table to this results file (benchmarks/results/*.json)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        ap.error("no CUDA device here; run with --dry-run to check the script on CPU")
    cases = [c for c in args.cases.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    bad = [c for c in cases if c not in CASES] + [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown case/method {bad}; cases: {', '.join(CASES)}; methods: {', '.join(METHODS)}")
    batch = args.batch or (2 if args.dry_run else 64)
    reps = args.reps or (1 if args.dry_run else 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, Triton interpreter)"
    print(f"torch {torch.__version__}, {name}, batch {batch}, best of {reps}, bf16 autocast", flush=True)
    rows = []
    for case in cases:
        rows += measure(case, methods, batch, reps, args.dry_run, device)
    print()
    print_table(rows, args.dry_run)
    print()
    for r in rows:
        if r["method"] == "kernel":
            ratio = r["t"] / r["t_plain"]
            verdict = "dry run: not a measurement" if args.dry_run else ("PASS" if ratio <= 1.05 else "MISS")
            print(f"{r['case']}: kernel {ratio:.2f}x plain bf16 SDPA (goal <= 1.05x): {verdict}")
    if args.json:
        from _record import write

        cols = ["case", "tokens", "method", "batch", "img/s", "x plain", "extra MB"]
        write(args.json, "GPU overhead: probing over the plain bf16 forward (bench_gpu.py)", cols,
              [{"case": CASES[r["case"]][2], "tokens": r["tokens"], "method": r["method"], "batch": r["batch"],
                "img/s": round(r["batch"] / r["t"], 1), "x plain": round(r["t"] / r["t_plain"], 3),
                "extra MB": round(r["peak_mb"] - r["plain_peak_mb"])} for r in rows],
              notes=[f"best of {reps}, bf16 autocast" + (": dry run, the timings mean nothing" if args.dry_run else "")],
              machine_note=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
