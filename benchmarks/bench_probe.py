"""What probing attention costs on top of the model's own forward pass.

    python benchmarks/bench_probe.py            # full table, under 10 minutes on 2 CPU cores
    python benchmarks/bench_probe.py --quick    # small batches, one timed pair per method (~1-2 min)

The cost floor is the model's own forward pass with its fused attention (SDPA); everything a
probe adds is overhead. Each row compares one way of getting per-layer, per-head MAD against
that floor, on random-init weights (``pretrained=False``: nothing is downloaded):

- ``plain``         the model's own forward (timm, fused attention / SDPA): the floor.
- ``usual``         transformers in eager mode with ``output_attentions=True`` (every layer kept),
                    then the reference notebook's NumPy MAD per layer, its distance matrix built by
                    the notebook's Python double loop (built once per process and reused: kinder to
                    this baseline than the notebook, which rebuilds it for every layer; the build
                    time is reported apart as ``setup``).
- ``timm-extract``  timm ``AttentionExtract`` (fused attention off, every layer kept), then a
                    vectorized torch MAD.
- ``probekit-mad``  ``pk.probe(pm, x, metrics=["mad"])``: the whole user-facing call.
- ``probekit``      ``pk.probe(pm, x, metrics=["mad", "entropy"])``.

``pk.probe`` runs its default ``attention_pass="auto"``: on this CPU one attention pass (the
layer's output from the metric blocks, softmax and metric sums in the C row kernel) from 64 tokens
on, the model's own SDPA below (README, "Which attention path runs"). Goals (issue 12): MAD + entropy on all layers <= 1.05x plain at
197 tokens, <= 1.15x at 785, <= 1.20x at 1370; extra peak memory under a third of the usual way's.

How it measures, and why:

- Time. Each method runs in its own fresh process, which also runs the plain forward of the same
  model (``usual``: transformers with SDPA; the others: timm fused); plain and method runs
  alternate (P M P M ...). ``x plain`` is the best method time over the best plain time (load
  from other processes only ever adds time, so best runs are the steadiest estimates);
  ``(pairs)`` is the median over neighbouring (plain, method) pairs of their ratio, a check.
  ``img/s`` is the batch size over the best method time.
- Memory. The Linux RSS high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``:
  reset, one plain forward -> the plain peak; reset, every method run -> the method peak; the
  extra peak is the difference. RSS counts everything the process really touched (torch's CPU
  allocations, NumPy, Python), not only what one allocator reports, and a fresh process per
  method keeps one method's leftovers out of the next one's numbers.

Run a single measurement with ``--worker CASE METHOD`` (prints one JSON line).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    # name: model, image size, batch (full, quick), timed pairs (full, quick)
    "vit-b16-224": dict(timm="vit_base_patch16_224", hf="vit", size=224, patch=16, width=768, heads=12,
                        batch=(16, 2), pairs=(5, 1), label="ViT-B/16 224 (197 tok)"),
    "vit-b16-448": dict(timm="vit_base_patch16_224", hf="vit", size=448, patch=16, width=768, heads=12,
                        batch=(4, 1), pairs=(4, 1), label="ViT-B/16 448 (785 tok)"),
    "vit-s14-518": dict(timm="vit_small_patch14_dinov2", hf="dinov2", size=518, patch=14, width=384, heads=6,
                        batch=(2, 1), pairs=(8, 1), label="ViT-S/14 DINOv2 518 (1370 tok)"),
}
METHODS = ("usual", "timm-extract", "probekit-mad", "probekit")


# -- memory: the RSS high-water mark -----------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


# -- the usual way: the reference notebook's NumPy MAD ---------------------------------------------
def notebook_distance_matrix(patch_size: int, num_patches: int, length: int):
    """The reference notebook's distance matrix: a Python double loop over patch pairs."""
    import numpy as np

    distance_matrix = np.zeros((num_patches, num_patches))
    for i in range(num_patches):
        for j in range(num_patches):
            if i == j:
                continue
            xi, yi = (int(i / length)), (i % length)
            xj, yj = (int(j / length)), (j % length)
            distance_matrix[i, j] = patch_size * np.linalg.norm([xi - xj, yi - yj])
    return distance_matrix


def notebook_mad(attention_weights, distance_matrix, num_cls_tokens: int = 1):
    """The reference notebook's MAD of one layer: NumPy, ``[B, H, T, T]`` -> ``[B, H]``."""
    import numpy as np

    attention_weights = attention_weights[..., num_cls_tokens:, num_cls_tokens:]
    h, w = distance_matrix.shape
    mean_distances = attention_weights * distance_matrix.reshape((1, 1, h, w))
    mean_distances = np.sum(mean_distances, axis=-1)
    return np.mean(mean_distances, axis=-1)


# -- the methods ---------------------------------------------------------------------------------------
def _hf_models(case: dict):
    """A transformers model in SDPA (plain) and an eager twin with the same weights (usual way)."""
    import transformers as tf

    if case["hf"] == "vit":
        cfg = tf.ViTConfig(image_size=case["size"], patch_size=case["patch"], hidden_size=case["width"],
                           num_attention_heads=case["heads"], intermediate_size=4 * case["width"])
        cls = tf.ViTModel
        kw = {"add_pooling_layer": False}
    else:
        cfg = tf.Dinov2Config(image_size=case["size"], patch_size=case["patch"], hidden_size=case["width"],
                              num_attention_heads=case["heads"])
        cls, kw = tf.Dinov2Model, {}
    cfg_sdpa, cfg_eager = copy.deepcopy(cfg), copy.deepcopy(cfg)  # the implementation lives on the config
    cfg_sdpa._attn_implementation, cfg_eager._attn_implementation = "sdpa", "eager"
    fast = cls(cfg_sdpa, **kw).eval()
    eager = cls(cfg_eager, **kw).eval()
    eager.load_state_dict(fast.state_dict())
    return fast, eager


def build(case: dict, method: str, batch: int, attention_pass: str = "auto", block_mb: float | None = None):
    """``(plain, run, info)``: two zero-argument callables on the same model, and notes."""
    import torch

    info: dict = {}
    g = torch.Generator().manual_seed(0)
    size = case["size"]
    if method == "usual":
        fast, eager = _hf_models(case)
        x = torch.randn(batch, 3, size, size, generator=g)
        n = (size // case["patch"]) ** 2
        t0 = time.perf_counter()
        dist = notebook_distance_matrix(case["patch"], n, size // case["patch"])
        info["setup_s"] = round(time.perf_counter() - t0, 2)

        def plain():
            return fast(pixel_values=x)

        def run():
            out = eager(pixel_values=x, output_attentions=True)
            return [notebook_mad(a.numpy(), dist).mean(0) for a in out.attentions]

        return plain, run, info

    import timm

    torch.manual_seed(0)
    if method == "timm-extract":
        from timm.utils import AttentionExtract

        model = timm.create_model(case["timm"], pretrained=False, img_size=size).eval()
        unfused = copy.deepcopy(model)
        for m in unfused.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        extract = AttentionExtract(unfused)  # fx, '*attn.softmax': every layer's probabilities
        x = torch.randn(batch, 3, size, size, generator=g)
        h = w = size // case["patch"]
        i = torch.arange(h * w)
        yx = torch.stack([i // w, i % w], -1).double() * case["patch"]
        dist = torch.cdist(yx, yx).float()
        p = model.num_prefix_tokens

        def plain():
            return model(x)

        def run():
            maps = extract(x)
            return [(a[:, :, p:, p:] * dist).sum(-1).mean(-1).mean(0) for a in maps.values()]

        return plain, run, info

    import probekit as pk

    pm = pk.load(f"timm:{case['timm']}", pretrained=False, image_size=size)
    x = torch.randn(batch, 3, size, size, generator=g)
    metrics = ["mad"] if method == "probekit-mad" else ["mad", "entropy"]
    info["metrics"] = metrics

    def plain():
        return pm.model(x)

    def run():
        t = pk.probe(pm, x, metrics=metrics, batch_size=batch, attention_pass=attention_pass,
                     block_mb=block_mb).table
        t = t[t.metric == "mad"]
        return [torch.tensor(t[t.layer == k].value.to_numpy()).view(batch, -1).mean(0).float()
                for k in sorted(t.layer.unique())]

    return plain, run, info


def worker(case_name: str, method: str, quick: bool, threads: int, attention_pass: str = "auto",
           block_mb: float | None = None) -> dict:
    """One fresh process: plain and method runs, alternating, with their RSS peaks."""
    import torch

    torch.set_num_threads(threads)
    case = CASES[case_name]
    batch, pairs = case["batch"][quick], case["pairs"][quick]
    plain, run, info = build(case, method, batch, attention_pass, block_mb)
    t_plain, t_method = [], []
    with torch.inference_mode():
        plain()  # warm-up: first-call allocations and kernel choices
        reset_peak()
        t = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t)
        plain_peak = peak_mb()
        reset_peak()
        t = time.perf_counter()
        mad = run()  # warm-up of the method (tracing, caches); its memory counts
        warm_s = time.perf_counter() - t
        for i in range(pairs):
            if i:
                t = time.perf_counter()
                plain()
                t_plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            mad = run()
            t_method.append(time.perf_counter() - t)
        method_peak = peak_mb()
    return {
        "case": case_name, "method": method, "batch": batch, "threads": threads,
        "t_plain": t_plain, "t_method": t_method, "warm_s": round(warm_s, 3),
        "plain_peak_mb": plain_peak, "method_peak_mb": method_peak,
        "mad_per_layer": [float(torch.as_tensor(v).double().mean()) for v in mad],
        "loadavg": os.getloadavg()[0], **info,
    }


# -- the parent: one process per (case, method), then the table -----------------------------------------
def run_worker(case: str, method: str, quick: bool, threads: int, attention_pass: str = "auto",
               block_mb: float | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--worker", case, method, "--threads", str(threads),
           "--attention-pass", attention_pass] + ([] if block_mb is None else ["--block-mb", str(block_mb)])
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"case": case, "method": method, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(r: dict) -> dict:
    """Throughput and ratios from one worker's alternating runs.

    ``ratio``: best method time over best plain time (noise on a shared machine only ever adds
    time, so the best run is the steadiest estimate of each); ``ratio_pairs``: the median over
    neighbouring (plain, method) pairs of their ratio, the check on it.
    """
    return {
        "ratio": min(r["t_method"]) / min(r["t_plain"]),
        "ratio_pairs": statistics.median(m / p for p, m in zip(r["t_plain"], r["t_method"])),
        "ips": r["batch"] / min(r["t_method"]),
        "plain_ips": r["batch"] / min(r["t_plain"]),
        "extra_mb": max(0.0, r["method_peak_mb"] - r["plain_peak_mb"]),
    }


def print_table(results: list[dict]) -> None:
    head = (f"{'case':<31} {'method':<13} {'batch':>5} {'img/s':>7} {'x plain':>8} {'(pairs)':>8} "
            f"{'plain img/s':>11} {'extra peak MB':>13}")
    print(head)
    print("-" * len(head))
    for case in CASES:
        rows = [r for r in results if r["case"] == case]
        if not rows:
            continue
        timm_rows = [r for r in rows if "error" not in r and r["method"] != "usual"]
        if timm_rows:  # the floor: timm's fused forward, measured in every timm worker of the case
            plain_ips = max(summarize(r)["plain_ips"] for r in timm_rows)
            print(f"{CASES[case]['label']:<31} {'plain':<13} {timm_rows[0]['batch']:>5} {plain_ips:>7.2f} "
                  f"{1:>8.2f} {1:>8.2f} {plain_ips:>11.2f} {0:>13.0f}")
        else:
            print(CASES[case]["label"])
        for r in rows:
            if "error" in r:
                print(f"{'':<31} {r['method']:<13} failed: {' '.join(r['error'])}")
                continue
            s = summarize(r)
            note = f"  (distance matrix {r['setup_s']} s, untimed)" if "setup_s" in r else ""
            print(f"{'':<31} {r['method']:<13} {r['batch']:>5} {s['ips']:>7.2f} {s['ratio']:>8.2f} "
                  f"{s['ratio_pairs']:>8.2f} {s['plain_ips']:>11.2f} {s['extra_mb']:>13.0f}{note}")


def check_targets(results: list[dict], quick: bool = False) -> list[str]:
    """The issue's targets, as lines ending PASS or MISS (``quick``: correctness only)."""
    by = {(r["case"], r["method"]): summarize(r) for r in results if "error" not in r}
    raw = {(r["case"], r["method"]): r for r in results if "error" not in r}
    lines = []
    if quick:
        lines.append("--quick: one timed run per method and small batches; speed and memory targets "
                     "are checked by the full run only.")
        by = {}
    s = by.get(("vit-b16-224", "probekit-mad"))
    if s:
        lines.append(f"ViT-B/16 224, MAD on 12 layers: probekit {s['ratio']:.2f}x plain (target <= 1.10): "
                     + ("PASS" if s["ratio"] <= 1.10 else "MISS"))
    goals = {"vit-b16-224": 1.05, "vit-b16-448": 1.15, "vit-s14-518": 1.20}  # issue 12: MAD + entropy, all layers
    for case, goal in goals.items():
        s = by.get((case, "probekit"))
        if s:
            lines.append(f"{case}: probekit MAD + entropy {s['ratio']:.2f}x plain (pairs {s['ratio_pairs']:.2f}; "
                         f"goal <= {goal:.2f}): " + ("PASS" if s["ratio"] <= goal else "MISS"))
    for case in ("vit-b16-448", "vit-s14-518"):
        pk_, usual, ext = by.get((case, "probekit")), by.get((case, "usual")), by.get((case, "timm-extract"))
        if not (pk_ and usual and ext):
            continue
        faster = pk_["ratio"] < usual["ratio"] and pk_["ratio"] < ext["ratio"]
        lines.append(f"{case}: probekit {pk_['ratio']:.2f}x vs usual {usual['ratio']:.2f}x, timm-extract "
                     f"{ext['ratio']:.2f}x: " + ("PASS" if faster else "MISS"))
        third = usual["extra_mb"] / 3
        lines.append(f"{case}: probekit extra peak {pk_['extra_mb']:.0f} MB vs usual/3 = {third:.0f} MB: "
                     + ("PASS" if pk_["extra_mb"] <= third else "MISS"))
    for case in CASES:  # same timm weights and inputs: probekit's MAD must equal AttentionExtract's
        a, b = raw.get((case, "probekit")), raw.get((case, "timm-extract"))
        if a and b:
            d = max(abs(u - v) / max(abs(v), 1e-9) for u, v in zip(a["mad_per_layer"], b["mad_per_layer"]))
            lines.append(f"{case}: MAD per layer, probekit vs timm AttentionExtract: max rel. diff {d:.1e} "
                         + ("PASS" if d < 1e-4 else "MISS"))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batches and one timed pair per method")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--json", help="also write the table (and the raw measurements) to this results file "
                    "(benchmarks/results/*.json; python benchmarks/results.py turns them into RESULTS.md)")
    ap.add_argument("--attention-pass", default="auto", choices=("auto", "fused", "separate"),
                    help="pk.probe's attention_pass for the probekit rows (default auto)")
    ap.add_argument("--block-mb", type=float, default=None,
                    help="pk.probe's block_mb for the probekit rows (default: the engine's own choice)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, quick=args.quick, threads=args.threads,
                                attention_pass=args.attention_pass, block_mb=args.block_mb)))
        return 0
    import torch

    cases = [c for c in args.cases.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    bad = [c for c in cases if c not in CASES] + [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown case/method {bad}; cases: {', '.join(CASES)}; methods: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, attention_pass={args.attention_pass}"
          + ("" if args.block_mb is None else f", block_mb={args.block_mb}")
          + (", --quick" if args.quick else ""), flush=True)
    results = []
    for case in cases:
        for method in methods:
            r = run_worker(case, method, args.quick, args.threads, args.attention_pass, args.block_mb)
            results.append(r)
            print(f"  {case} {method}: " + (f"failed: {r['error']}" if "error" in r else
                  f"method {statistics.median(r['t_method']):.2f} s, plain {statistics.median(r['t_plain']):.2f} s"),
                  file=sys.stderr, flush=True)
    print()
    print_table(results)
    print()
    for line in check_targets(results, quick=args.quick):
        print(line)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        write_json(args.json, results, args)
    return 0


def write_json(path: str, results: list[dict], args) -> None:
    """The table as a results file (benchmarks/_record.py), the raw measurements under ``raw``."""
    from _record import write

    cols = ["case", "method", "batch", "img/s", "x plain", "pairs", "plain img/s", "extra peak MB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"case": CASES[r["case"]]["label"], "method": r["method"], "img/s": "failed"})
            continue
        s = summarize(r)
        rows.append({"case": CASES[r["case"]]["label"], "method": r["method"], "batch": r["batch"],
                     "img/s": round(s["ips"], 2), "x plain": round(s["ratio"], 3), "pairs": round(s["ratio_pairs"], 3),
                     "plain img/s": round(s["plain_ips"], 2), "extra peak MB": round(s["extra_mb"])})
    title = "CPU overhead: probing over the plain forward"
    if args.attention_pass != "auto" or args.block_mb is not None:
        title += f" (attention_pass={args.attention_pass}, block_mb={args.block_mb})"
    write(path, title, cols, rows, notes=[f"{args.threads} torch threads" + (", --quick" if args.quick else "")]
          + check_targets(results, quick=args.quick), raw=results)


if __name__ == "__main__":
    sys.exit(main())
