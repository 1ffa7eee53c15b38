"""What one small probe call costs over the model's own forward, beside timm AttentionExtract (issue 25).

    python benchmarks/bench_call_cost.py                 # 224 px, batch 4 and 1, 1 and 2 threads, 785 tokens (~6 min)
    python benchmarks/bench_call_cost.py --long          # and DINOv2-S/14 at 518 px (1370 tokens, ~3 min more)
    python benchmarks/bench_call_cost.py --rounds 10 --cases 224-b1-t1   # one case, quick look
    python benchmarks/bench_call_cost.py --malloc        # the plain forward before and after glibc's malloc tuning

A notebook user probes one image or a few: ``pk.probe(pm, x, metrics=["mad"])`` on a
preprocessed tensor, MAD on every layer and head of timm ``vit_small_patch16_224`` at random
init (``pretrained=False``: nothing is downloaded). Whatever that call does beyond the model's
forward (argument checks, image handling, the tap, the per-layer reduction, the table and the
run record) is its cost. probekit ends each forward pass once the last layer has reported
(``stop_early``, the default: the last block's MLP and the head are read by nothing); the
``probekit-whole`` row runs every forward pass to its end (``stop_early=False``), the same call's
cost with nothing of the model skipped. The reference row is timm's own way: ``AttentionExtract`` on a copy of
the model with fused attention off (every layer's probabilities kept), then MAD from them with
a vectorized torch expression, as in benchmarks/bench_probe.py. Its default (torch.fx) graph
ends at the last layer's softmax: the last block's attention output, MLP and the head are never
computed (~6% of a ViT-S forward), so this row can come out below the plain forward.

How it measures, and why:

- Paired, order-alternating rounds. Each case runs in a fresh process with its own torch thread
  count; every round times the plain forward, probekit, probekit-whole and AttentionExtract + MAD
  once each, in the order P K W T, then T W K P in the next round, and so on. A method's ratio in a round is its
  time over that round's plain forward: load from other processes (this 2-core VM is shared)
  moves neighbouring runs together, so paired ratios are steadier than best-of or means. The
  table shows the median ratio over the rounds with its interquartile range (IQR), for wall
  time and, as a check less sensitive to other processes, for the process's CPU time.
- Memory. The Linux RSS high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``,
  over one more run of each method after the timed rounds (steady state: caches and workspace
  buffers already made), less the plain forward's: "extra steady MB".
- Equality. probekit's MAD per layer is compared with AttentionExtract's (same weights, same
  inputs): the check that both rows measure the same thing.

Goals (issue 25): probekit <= 1.05x the plain forward at 224 px, batch 4 and 1, 1 and 2
threads, and below AttentionExtract + MAD in the same run; at 785 and 1370 tokens no worse than
before (benchmarks/RESULTS.md, "CPU overhead: probing over the plain forward"), and no more memory.

- Malloc (``--malloc``). Decoding image files tunes glibc's malloc for the whole process
  (:func:`probekit.inputs.memory.tame`); a probe on a tensor no longer does. This measures the
  plain forward before and after that tuning in one process: what it costs every forward pass.

Run a single case with ``--worker CASE`` (prints one JSON line).
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

from bench_probe import _status_kb, reset_peak  # this script's folder is on sys.path

CASES = {
    # name: timm model, image size, batch, torch threads, rounds (default), label
    "224-b4-t1": dict(model="vit_small_patch16_224", size=224, patch=16, batch=4, threads=1, rounds=40),
    "224-b1-t1": dict(model="vit_small_patch16_224", size=224, patch=16, batch=1, threads=1, rounds=60),
    "224-b4-t2": dict(model="vit_small_patch16_224", size=224, patch=16, batch=4, threads=2, rounds=40),
    "224-b1-t2": dict(model="vit_small_patch16_224", size=224, patch=16, batch=1, threads=2, rounds=60),
    "448-b1-t1": dict(model="vit_small_patch16_224", size=448, patch=16, batch=1, threads=1, rounds=15),
    "518-b2-t2": dict(model="vit_small_patch14_dinov2", size=518, patch=14, batch=2, threads=2, rounds=8, long=True),
}
METHODS = ("plain", "probekit", "probekit-whole", "timm-extract")
GOAL = 1.05  # issue 25: probekit's time over the plain forward at 224 px


def _label(case: dict) -> str:
    tokens = (case["size"] // case["patch"]) ** 2 + 1
    return f"{case['model']} {case['size']} px ({tokens} tok), batch {case['batch']}, {case['threads']} thr"


# -- memory: the RSS high-water mark (read as benchmarks/bench_probe.py reads it) -------------------
def _extra_peak_mb(fn) -> float:
    """RSS high-water mark of one call of ``fn`` over the RSS before it (MB)."""
    reset_peak()  # VmHWM := current RSS
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


# -- one case, in its own process -------------------------------------------------------------------
def build(case: dict):
    """``{method: zero-argument callable}`` on one model and input, and the MAD per layer of the two probes."""
    import torch
    from timm.utils import AttentionExtract

    import probekit as pk

    torch.manual_seed(0)
    size, batch = case["size"], case["batch"]
    pm = pk.load(f"timm:{case['model']}", pretrained=False, image_size=size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = pm.model.eval()
    unfused = copy.deepcopy(model)
    for m in unfused.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    extract = AttentionExtract(unfused)  # fx, '*attn.softmax': every layer's probabilities
    h = w = size // case["patch"]
    i = torch.arange(h * w)
    yx = torch.stack([i // w, i % w], -1).double() * case["patch"]
    dist = torch.cdist(yx, yx).float()
    p = model.num_prefix_tokens
    mads: dict[str, list[float]] = {}

    def plain():
        with torch.inference_mode():
            model(x)

    def probekit():  # the notebook call: images in, Results out
        res = pk.probe(pm, x, metrics=["mad"], batch_size=batch)
        mads["probekit"] = res.table.groupby("layer", observed=True)["value"].mean().tolist()

    def probekit_whole():  # the same, each forward run to its end (the head's output, read by nothing)
        res = pk.probe(pm, x, metrics=["mad"], batch_size=batch, stop_early=False)
        mads["probekit-whole"] = res.table.groupby("layer", observed=True)["value"].mean().tolist()

    def timm_extract():
        with torch.inference_mode():
            maps = extract(x)
            mads["timm-extract"] = [float((a[:, :, p:, p:] * dist).sum(-1).mean(-1).mean()) for a in maps.values()]

    return {"plain": plain, "probekit": probekit, "probekit-whole": probekit_whole, "timm-extract": timm_extract}, mads


def worker(name: str, rounds: int) -> dict:
    import torch

    case = CASES[name]
    torch.set_num_threads(case["threads"])
    fns, mads = build(case)
    for _ in range(2):  # warm-up: first-call allocations, kernel builds, fx tracing
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    load0 = os.getloadavg()[0]
    for r in range(rounds):
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
            c, t = time.process_time(), time.perf_counter()
            fns[m]()
            wall[m].append(time.perf_counter() - t)
            cpu[m].append(time.process_time() - c)
    extra = {m: min(_extra_peak_mb(fns[m]) for _ in range(2)) for m in METHODS}
    return {"case": name, "wall": wall, "cpu": cpu, "peak_mb": extra, "mad": mads,
            "loadavg": [load0, os.getloadavg()[0]]}


def malloc_worker(name: str, rounds: int) -> dict:
    """The plain forward's wall time before and after glibc's malloc is tuned as image decoding tunes it
    (:func:`probekit.inputs.memory.tame`), in one process: what the tuning costs every forward pass."""
    import torch

    from probekit.inputs.memory import tame

    case = CASES[name]
    torch.set_num_threads(case["threads"])
    fns, _ = build(case)
    plain = fns["plain"]

    def median_ms() -> float:
        for _ in range(3):
            plain()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            plain()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    before = median_ms()
    tuned = tame()
    return {"case": name, "before_ms": before, "after_ms": median_ms(), "tuned": tuned}


def run_worker(name: str, rounds: int, malloc: bool = False) -> dict:
    threads = str(CASES[name]["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, __file__, "--malloc-worker" if malloc else "--worker", name, "--rounds",
                          str(rounds)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"case": name, "error": (out.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the table --------------------------------------------------------------------------------------------
def _ratios(r: dict, kind: str, method: str) -> list[float]:
    return [a / b for a, b in zip(r[kind][method], r[kind]["plain"], strict=True)]


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4)
    return q1, statistics.median(xs), q3


def summarize(r: dict) -> dict[str, dict]:
    """Per method: median ratio to the plain forward with its IQR (wall, CPU), and extra steady MB."""
    out = {}
    for m in METHODS[1:]:
        lo, med, hi = _quartiles(_ratios(r, "wall", m))
        out[m] = {"x": med, "iqr": (lo, hi), "cpu_x": statistics.median(_ratios(r, "cpu", m)),
                  "extra_mb": r["peak_mb"][m] - r["peak_mb"]["plain"]}
    out["plain"] = {"ms": 1e3 * statistics.median(r["wall"]["plain"])}
    return out


def check(results: list[dict]) -> list[str]:
    """The issue's goals, as lines ending PASS or MISS (and the equality check)."""
    lines = []
    for r in results:
        if "error" in r:
            continue
        s = summarize(r)
        pk_, ext = s["probekit"], s["timm-extract"]
        case = CASES[r["case"]]
        if case["size"] == 224:
            lines.append(f"{r['case']}: probekit {pk_['x']:.3f}x plain (goal <= {GOAL}): "
                         + ("PASS" if pk_["x"] <= GOAL else "MISS"))
            lines.append(f"{r['case']}: probekit {pk_['x']:.3f}x < timm AttentionExtract + MAD {ext['x']:.3f}x: "
                         + ("PASS" if pk_["x"] < ext["x"] else "MISS"))
        lines.append(f"{r['case']}: extra steady MB probekit {pk_['extra_mb']:.0f} vs timm {ext['extra_mb']:.0f}")
        for mine in ("probekit", "probekit-whole"):
            a, b = r["mad"].get(mine), r["mad"].get("timm-extract")
            if a and b:
                d = max(abs(u - v) / max(abs(v), 1e-9) for u, v in zip(a, b, strict=True))
                lines.append(f"{r['case']}: MAD per layer, {mine} vs AttentionExtract: max rel. diff {d:.1e} "
                             + ("PASS" if d < 1e-4 else "MISS"))
    return lines


def rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        label = _label(CASES[r["case"]])
        if "error" in r:
            out.append({"case": label, "method": "failed: " + r["error"]})
            continue
        s = summarize(r)
        rounds = len(r["wall"]["plain"])
        for m in METHODS[1:]:
            x = s[m]
            out.append({"case": label, "method": m, "x plain (median)": round(x["x"], 3),
                        "IQR": f"{x['iqr'][0]:.3f}-{x['iqr'][1]:.3f}", "CPU time x plain": round(x["cpu_x"], 3),
                        "extra steady MB": round(x["extra_mb"]), "plain ms": round(s["plain"]["ms"], 1),
                        "rounds": rounds, "load": f"{r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f}"})
    return out


COLUMNS = ["case", "method", "x plain (median)", "IQR", "CPU time x plain", "extra steady MB", "plain ms",
           "rounds", "load"]


def print_table(table: list[dict]) -> None:
    widths = {c: max(len(c), *(len(str(t.get(c, ""))) for t in table)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS))
    print("  ".join("-" * widths[c] for c in COLUMNS))
    for t in table:
        print("  ".join(str(t.get(c, "")).ljust(widths[c]) for c in COLUMNS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(CASES)} "
                    "(default: all but 518-b2-t2; --long adds it)")
    ap.add_argument("--long", action="store_true", help="also DINOv2-S/14 at 518 px (1370 tokens), batch 2, 2 threads")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default: the case's own)")
    ap.add_argument("--json", help="also write the table (and the raw times) to this results file "
                    "(benchmarks/results/*.json; python benchmarks/results.py turns them into RESULTS.md)")
    ap.add_argument("--malloc", action="store_true", help="instead: the plain forward before and after glibc's "
                    "malloc is tuned as image decoding tunes it (probekit.inputs.memory.tame), one process per case")
    ap.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    ap.add_argument("--malloc-worker", metavar="CASE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds or CASES[args.worker]["rounds"])))
        return 0
    if args.malloc_worker:
        print(json.dumps(malloc_worker(args.malloc_worker, args.rounds or 20)))
        return 0
    import torch

    names = args.cases.split(",") if args.cases else [n for n, c in CASES.items() if args.long or not c.get("long")]
    bad = [n for n in names if n not in CASES]
    if bad:
        ap.error(f"unknown cases {bad}; cases: {', '.join(CASES)}")
    t0 = time.perf_counter()
    if args.malloc:
        print("plain forward, median ms: before and after probekit.inputs.memory.tame() in the same process")
        for name in names:
            r = run_worker(name, args.rounds or 20, malloc=True)
            if "error" in r:
                print(f"  {name}: failed: {r['error']}")
            else:
                print(f"  {name}: {r['before_ms']:.1f} -> {r['after_ms']:.1f} ms "
                      f"({r['after_ms'] / r['before_ms']:.3f}x; malloc tuned: {r['tuned']})")
        return 0
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; MAD on every layer and head, random init", flush=True)
    results = []
    for name in names:
        r = run_worker(name, args.rounds or CASES[name]["rounds"])
        results.append(r)
        if "error" in r:
            print(f"  {name}: failed: {r['error']}", file=sys.stderr, flush=True)
        else:
            s = summarize(r)
            print(f"  {name}: probekit {s['probekit']['x']:.3f}x, probekit-whole {s['probekit-whole']['x']:.3f}x, "
                  f"timm-extract {s['timm-extract']['x']:.3f}x "
                  f"(plain {s['plain']['ms']:.0f} ms)", file=sys.stderr, flush=True)
    table = rows(results)
    print()
    print_table(table)
    print()
    lines = check(results)
    for line in lines:
        print(line)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        from _record import write

        write(args.json, "Small calls: probekit and timm AttentionExtract over the plain forward", COLUMNS, table,
              notes=["timm vit_small_patch16_224 (and DINOv2-S/14 with --long), random init, MAD on every layer and "
                     "head; probekit = pk.probe(pm, x, metrics=['mad']) on a tensor (the whole call, table and run "
                     "record included), each forward ended once the last layer has reported (stop_early, the "
                     "default); probekit-whole = the same with stop_early=False (every forward to its end); "
                     "timm-extract = AttentionExtract on a fused_attn=False copy, then MAD in torch.",
                     "x plain: median over paired order-alternating rounds of the method's wall time over the same "
                     "round's plain forward; IQR: its quartiles; CPU time x plain: the same with the process's "
                     "CPU time.",
                     "extra steady MB: RSS high-water mark of one more run after the timed rounds, over the plain "
                     "forward's (noise of a few MB either way). Not in it: the workspace pk.probe keeps for the next "
                     "call when it is 8 MiB or less (the C kernel's per-thread scratch and the layer's row terms), "
                     "already resident before the measured run.",
                     "timm AttentionExtract (fx, its default) returns a graph cut after the last layer's softmax: the "
                     "last block's attention output, MLP and head are not computed (~6% of a ViT-S forward), so its "
                     "row can come out below the plain forward; probekit's default skips the same tail.", *lines],
              raw=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
