"""Resident memory against the number of images probed: flat, or growing with the set?

    python benchmarks/bench_memory.py                  # 600 images, ViT-S/16, batch 32 (~5 min on 2 cores)
    python benchmarks/bench_memory.py --images 192 --model vit_tiny_patch16_224   # quick (~1 min)

Each mode runs in a fresh process over N copies of the bundled photos (names differ, so
nothing is cached), ViT-S/16 at random init, batch 32, MAD + entropy, the local engine with
num_workers=0. After every batch the process records its RSS (``/proc/self/statm``);
the table prints RSS after the first batch, at 25/50/75/100% of the images, the growth from
the first batch to the end, and images/s.

Modes:
- ``default``: probekit as shipped (glibc tuned by ``mallopt`` on the first batch: probekit.inputs.memory).
- ``off``:     that tuning turned off (``PROBEKIT_MALLOC_TUNE=0``): what the issue measured.
- ``env``:     tuning off, glibc tuned from outside (``MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "default": {},
    "off": {"PROBEKIT_MALLOC_TUNE": "0"},
    "env": {"PROBEKIT_MALLOC_TUNE": "0", "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0"},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(folder: str, model: str, batch: int) -> None:
    import torch

    import probekit as pk

    torch.manual_seed(0)
    pm = pk.load(f"timm:{model}", pretrained=False)
    trace = []
    t0 = time.perf_counter()
    pk.probe(pm, folder, ["mad", "entropy"], batch_size=batch,
             progress=lambda done, total: trace.append((done, round(_rss_mb(), 1))))
    print(json.dumps({"trace": trace, "seconds": time.perf_counter() - t0}))


def _copies(n: int) -> str:
    import probekit as pk

    folder = Path(tempfile.mkdtemp(prefix="pk-mem-"))
    photos = pk.sample_images()
    for i in range(n):
        src = photos[i % len(photos)]
        shutil.copy(src, folder / f"{i:05d}{src.suffix}")
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="also write the table to this results file (benchmarks/results/*.json)")
    ap.add_argument("--worker", nargs=3, metavar=("FOLDER", "MODEL", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], int(a.worker[2]))
        return
    folder = _copies(a.images)
    try:
        print(f"{a.images} images (copies of the bundled photos), timm {a.model} random init, batch {a.batch}, "
              f"MAD + entropy, local engine; load: {os.getloadavg()[0]:.2f} (1-min avg), {os.cpu_count()} CPUs")
        print(f"{'mode':8} {'1st batch':>10} {'25%':>8} {'50%':>8} {'75%':>8} {'100%':>8} {'growth':>8} {'img/s':>7}  (RSS, MB)")
        rows = []
        for mode in a.modes.split(","):
            env = {**os.environ, **MODES[mode]}
            out = subprocess.run([sys.executable, __file__, "--worker", folder, a.model, str(a.batch)],
                                 env=env, capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            tr = rec["trace"]
            at = [tr[min(len(tr) - 1, max(0, round(q * len(tr)) - 1))][1] for q in (0.25, 0.5, 0.75, 1.0)]
            print(f"{mode:8} {tr[0][1]:>10.0f} " + " ".join(f"{v:>8.0f}" for v in at) +
                  f" {tr[-1][1] - tr[0][1]:>+8.0f} {a.images / rec['seconds']:>7.2f}")
            rows.append({"mode": mode, "images, model": f"{a.images}, {a.model}", "RSS after 1st batch (MB)": round(tr[0][1]),
                         "RSS at 50% (MB)": round(at[1]), "RSS at the end (MB)": round(tr[-1][1]),
                         "growth (MB)": f"{tr[-1][1] - tr[0][1]:+.0f}", "img/s": round(a.images / rec["seconds"], 2)})
        if a.json:
            from _record import write

            write(a.json, "Resident memory over the image set (bench_memory.py)", list(rows[0]), rows,
                  notes=[f"batch {a.batch}, MAD + entropy, local engine, num_workers=0"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
