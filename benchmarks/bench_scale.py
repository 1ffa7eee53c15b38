"""Images/s of the local engine against the Ray engine (1 and 2 replicas), and Ray's fixed cost.

    python benchmarks/bench_scale.py                     # 96 images, ViT-S/16 random init (~5-10 min on 2 cores)
    python benchmarks/bench_scale.py --images 48 --skip-quickstart

Each case runs ``probekit.runs.compare`` in a fresh process on a fresh run directory (nothing cached):

- ``local``:  the local engine (the reference).
- ``ray-1``, ``ray-2``: the Ray engine on a local cluster (``ray.init(num_cpus=2)``) with 1 or 2
  replicas of the model; decoding runs in Ray tasks beside them.
- ``quickstart``: configs/quickstart.yaml (6 photos, the ONNX DINOv2 and a random-init ViT-S/14)
  on both engines: on so small a set the difference is Ray's fixed cost (cluster start, worker
  processes importing torch and loading the model).

Printed per case: wall time, images/s over the whole call, and where the time went: ``ray.init``,
the time to the first finished shard, and the summed per-chunk decode and probe seconds that the
Ray engine records in run.json (``engine.shards``). The 1-minute load average is printed with
every row: the machine may be shared, and the numbers move with it.
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

RUN = """\
name: scale
models:
  - model: timm:vit_small_patch16_224
    label: ViT-S/16 random init
    options: {{pretrained: false}}
images: {{path: {images}}}
metrics: [mad, entropy]
batch_size: {batch}
figures: []
resources: {{cpus: {cpus}, decode_cpus: 0.25, replicas: {replicas}, shard_size: {shard}}}
"""


def worker(run: str, engine: str, out: str) -> None:
    t0 = time.perf_counter()
    init_s = None
    if engine == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
    from probekit.api import compare

    t1 = time.perf_counter()
    cmp = compare(run, out=out, engine=engine)
    wall = time.perf_counter() - t1
    rec = json.loads((Path(out) / "run.json").read_text())
    eng = rec.get("engine") or {}
    shards = [s for s in eng.get("shards", []) if s.get("computed")]
    print(json.dumps({
        "wall": wall, "init": init_s, "images": rec["images"]["count"], "ok": cmp.ok,
        "first_shard": min((s["done_s"] for s in shards), default=None),
        "decode": sum(s["decode_s"] for s in shards) if shards else None,
        "probe": sum(s["probe_s"] for s in shards) if shards else None,
        "load": os.getloadavg()[0],
    }))


def _case(run: Path, engine: str) -> dict:
    out = tempfile.mkdtemp(prefix="pk-scale-")
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", str(run), engine, out],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if p.returncode:
            raise SystemExit(f"{engine} failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _row(name: str, r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"{name:16} {r['wall']:>7.1f} {r['images'] / r['wall']:>6.2f} {f(r['init']):>7} {f(r['first_shard']):>7} "
            f"{f(r['decode']):>7} {f(r['probe']):>7} {r['load']:>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker)
        return
    import probekit as pk

    tmp = Path(tempfile.mkdtemp(prefix="pk-scale-img-"))
    try:
        photos = pk.sample_images()
        for i in range(a.images):
            shutil.copy(photos[i % len(photos)], tmp / f"{i:05d}{photos[i % len(photos)].suffix}")
        print(f"{a.images} images (copies of the bundled photos), timm ViT-S/16 224 random init, batch {a.batch}, "
              f"MAD + entropy; {os.cpu_count()} CPUs; uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        print(f"{'case':16} {'wall s':>7} {'img/s':>6} {'init s':>7} {'1st sh':>7} {'dec s':>7} {'probe s':>7} {'load':>6}")
        for name, engine, replicas, cpus in (("local", "local", 1, 1), ("ray-1", "ray", 1, 1), ("ray-2", "ray", 2, 0.75)):
            run = tmp / f"{name}.yaml"
            run.write_text(RUN.format(images=tmp, batch=a.batch, replicas=replicas, cpus=cpus, shard=4 * a.batch))
            print(_row(name, _case(run, engine)), flush=True)
        if not a.skip_quickstart:
            qs = Path(pk.__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
            for engine in ("local", "ray"):
                print(_row(f"quickstart {engine}", _case(qs, engine)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
