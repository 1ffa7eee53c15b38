"""Result rows at ImageNet-val x 20 models scale through a whole comparison, with no model: peak RSS of
the driver and of every process, and rows/s written (issue 24, item 5).

    python benchmarks/bench_results_scale.py --images 500 --engine local          # 2.88 M rows, ~1 min
    python benchmarks/bench_results_scale.py --models 2 --images 500 --figures    # and the default figures drawn
    python benchmarks/bench_results_scale.py --models 2 --images 500 --figures --report  # and report.html
    python benchmarks/bench_results_scale.py --models 4 --images 2500,12500 --engine ray --raw runs.jsonl
    python benchmarks/bench_results_scale.py --from-raw a.jsonl,b.jsonl --json benchmarks/results/NAME.json
    python benchmarks/bench_results_scale.py             # 20 x 50,000 x 12 x 12 x 2 = 288 M rows (hours here)

Figures: benchmarks/RESULTS.md, section "Result rows at scale: driver and process memory, rows/s
(bench_results_scale.py, no model)", and docs/scaling.md section 7. To measure another commit,
run this file with ``PYTHONPATH`` set to an export of it (``git archive``) and ``--label`` naming it.

Each case runs ``probekit.runs.compare.run_comparison`` in a fresh process on a fresh run directory
(engine ``local`` or ``ray`` on ``ray.init(num_cpus=2)``) with two things replaced, and nothing else:

- ``probekit.models.load`` gives a stand-in model (no weights, a preprocessing that makes a 1x1 pixel);
- ``probekit.engine.probe.probe`` gives, for the images it is handed, ``layers x heads`` rows per metric
  and image, built by the engine's own table constructor (:func:`probekit.results.long_table`, what
  ``probe`` ends with) from random float64 values (incompressible, as real values nearly are).

So everything a real run does with its rows is measured: the local engine's per-model parts, or
the Ray engine's chunks (pickled in the replica, sent to the driver, gathered into sealed shard
parts, joined into whole-model parts), then the run's ``results.parquet`` and ``summary.csv``.
What is left out is the forward pass and the attention arithmetic (``benchmarks/bench_probe.py``,
``bench_scale.py``); the images are real files (1x1 PNGs, decoded by the Ray engine's decoding
tasks), because the run's image set lists and fingerprints them.

The Ray workers are patched by a ``worker_process_setup_hook``; every process that runs the stand-in
``probe`` writes its own RSS high-water mark (``VmHWM``) to a file after each call, and the driver
samples ``VmHWM`` of all its descendant processes (Ray's GCS, raylet and workers) every 0.5 s.

``--heads 12`` (the default) gives the 288 rows per image of docs/scaling.md (ViT-B/16: 12 layers x
12 heads x 2 metrics); 20 x 50,000 images x 288 = 288 M rows. With 6 heads (ViT-S) it is 144 M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import _status_kb, reset_peak  # noqa: E402

# distinct timm ViTs, so every model has its own part keys (a key ignores the label, not the spec)
_TIMM = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
         "vit_small_patch32_224", "vit_base_patch32_224", "deit_tiny_patch16_224", "deit_small_patch16_224",
         "deit_base_patch16_224", "vit_small_patch16_384", "vit_base_patch16_384", "vit_tiny_patch16_384",
         "vit_base_patch8_224", "vit_small_patch8_224", "deit_tiny_distilled_patch16_224",
         "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224", "vit_large_patch32_224",
         "vit_large_patch16_384", "vit_base_patch32_384", "vit_large_patch32_384", "vit_tiny_r_s16_p8_224",
         "vit_small_r26_s32_224", "deit_base_patch16_384"]
_METRICS = ["mad", "entropy"]
_ENV = "PK_BENCH_ROWS"  # JSON: {"layers", "heads", "hwm_dir"}: what the stand-in probe makes, where it reports


# -- the stand-ins (in the driver and, through the setup hook, in every Ray worker) -------------------
def _hwm_kb(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _report_hwm(where: str) -> None:
    """This process's RSS high-water mark, overwritten after each call (read when the run is over)."""
    kb = _hwm_kb()
    path = Path(where) / f"{os.getpid()}.json"
    path.write_text(json.dumps({"pid": os.getpid(), "hwm_kb": kb, "argv0": Path(sys.argv[0]).name}))


def _fake_load(name: str, *, label: str | None = None, device=None, dtype=None, **options):
    """A model stand-in: the preprocessing makes a 1x1 pixel; nothing else is ever called on it (the
    stand-in probe computes nothing)."""
    import torch

    def preprocess(img):
        return torch.zeros(3, 1, 1)

    adapter = SimpleNamespace(info={}, parameters_count=lambda: 0)
    cfg = json.loads(os.environ[_ENV])
    return SimpleNamespace(preprocess=preprocess, adapter=adapter, meta={}, label=label or name, name=name,
                           num_layers=cfg["layers"], num_heads=cfg["heads"])  # (what the report's explorer asks)


def _fake_probe(model, images, metrics, *, batch_size: int = 32, dtype=None, label: str | None = None, **_):
    """``layers x heads`` rows per metric and image, in the engine's table (long_table), random values."""
    import numpy as np
    import torch

    from probekit.results import Results, long_table

    cfg = json.loads(os.environ[_ENV])
    nl, nh = cfg["layers"], cfg["heads"]
    names = [str(i) for i in range(len(images))] if isinstance(images, torch.Tensor) else list(images.names)
    labels = [m.label for m in metrics]
    n, k = len(names), len(labels)
    per = nl * nh
    rows = n * per * k
    metric = np.repeat(np.arange(k), n * per)
    image = np.tile(np.repeat(np.arange(n), per), k)
    layer = np.tile(np.repeat(np.arange(nl), nh), n * k)
    head = np.tile(np.arange(nh), n * nl * k)
    value = np.random.default_rng().random(rows)  # fresh per call: no two chunks alike (parquet would share them)
    table = long_table(label or "model", np.asarray(names, dtype=object)[image], layer, head, labels, metric, value)
    meta: dict = {"model": label or "model", "spec": str(getattr(model, "name", "")), "adapter": "synthetic",
            "model_meta": {}, "layout": None, "geometry": None, "metrics": {lbl: {} for lbl in labels},
            "images": {"count": n, "fingerprint": "synthetic", "skipped": []}, "device": "cpu",
            "dtype": "float32", "seconds": 0.0, "versions": None, "batch_size": batch_size}
    res = Results._of_long_table(table, {}, meta)
    _report_hwm(cfg["hwm_dir"])
    return res


def install() -> None:
    """Replace the model loader and the probe in this process (the driver's and each Ray worker's)."""
    import probekit.engine.probe
    import probekit.models

    probekit.models.load = _fake_load
    probekit.engine.probe.probe = _fake_probe  # type: ignore[assignment]


# -- one case, in its own process -------------------------------------------------------------------
def _images(n: int) -> Path:
    """A folder of ``n`` 1x1 PNGs (made once per n under the temp folder)."""
    import io

    from PIL import Image

    folder = Path(tempfile.gettempdir()) / f"pk-bench-results-{n}"
    if (folder / ".done").exists():
        return folder
    folder.mkdir(exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (1, 1), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buf, "PNG")
        (folder / f"img_{i:06d}.png").write_bytes(buf.getvalue())
    (folder / ".done").write_text("")
    return folder


def _config(args, images: Path) -> dict:
    models = [{"model": f"timm:{name}", "label": f"m{i:02d}", "options": {"pretrained": False}}
              for i, name in enumerate(_TIMM[: args.models])]
    cfg = {"name": "results-scale", "models": models, "images": {"path": str(images)},
           "metrics": _METRICS[: args.metrics], "batch_size": args.batch, "figures": [],
           "resources": {"cpus": args.replica_cpus, "decode_cpus": 0.25, "replicas": 1,
                         "shard_size": args.shard}}
    if args.figures:  # the run file's default figures (every kind its rows give), drawn by the driver
        del cfg["figures"]
    return cfg


class _Sampler(threading.Thread):
    """VmHWM of every descendant of this process, every ``every`` s (the peak as of the last sample)."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.peaks: dict[int, tuple[int, str]] = {}
        self.own: dict[str, int] = {}  # this process's peak RssAnon / RssShmem / RssFile (kB) over the samples

    def _children(self) -> list[int]:
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        mine, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier and p not in mine}
            mine |= frontier
        return sorted(mine)

    def _own(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("RssAnon", "RssShmem", "RssFile"):
                    self.own[key] = max(self.own.get(key, 0), int(line.split()[1]))

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self._own()
            for pid in self._children():
                kb = _hwm_kb(pid)
                if kb is None:
                    continue
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                old = self.peaks.get(pid, (0, name))
                self.peaks[pid] = (max(old[0], kb), name if name else old[1])


def _rows_on_disk(path: Path) -> int:
    """Rows in results.parquet, a folder of part files or one file, from the files' footers."""
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(args) -> None:
    hwm_dir = Path(tempfile.mkdtemp(prefix="pk-bench-hwm-"))
    os.environ[_ENV] = json.dumps({"layers": args.layers, "heads": args.heads, "hwm_dir": str(hwm_dir)})
    images = _images(args.images)
    out = Path(tempfile.mkdtemp(prefix="pk-bench-run-", dir=args.tmp)) / "run"
    import probekit.runs.compare  # noqa: F401  (imports done before the peak is reset)
    views = None
    if args.figures or args.report:  # what pk.compare passes; matplotlib and seaborn imported now
        from probekit.views.outputs import RunViews
        from probekit.views.plots._common import _sns

        _sns()
        views = RunViews(figures=args.figures, report=args.report)
    install()
    sampler = _Sampler()
    init_s = None
    if args.engine == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": install,
                              "env_vars": {_ENV: os.environ[_ENV],
                                           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                                                          os.environ.get("PYTHONPATH", "")])}})
        init_s = time.perf_counter() - t0
    rss0 = _status_kb("VmRSS") / 1024
    reset_peak()
    sampler.start()
    from probekit.runs.compare import run_comparison

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        cmp = run_comparison(_config(args, images), out=out, views=views, engine=args.engine)
        if cmp.failures:
            raise SystemExit(f"{cmp.failures[0].model} failed ({cmp.failures[0].stage}): {cmp.failures[0].error}: "
                             f"{cmp.failures[0].message}")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        driver_mb = _status_kb("VmHWM") / 1024
        sampler.stop.set()
        sampler.join()
        rows = args.models * args.images * args.layers * args.heads * args.metrics
        written = _rows_on_disk(out / "results.parquet")  # (len(cmp.results) could read every row)
        procs = [json.loads(p.read_text()) for p in hwm_dir.glob("*.json")]
        workers = [p["hwm_kb"] / 1024 for p in procs if p["pid"] != os.getpid()]
        others = {pid: (kb / 1024, name) for pid, (kb, name) in sampler.peaks.items()
                  if pid not in {p["pid"] for p in procs}}
        rec = json.loads((out / "run.json").read_text())
        print(json.dumps({
            "engine": args.engine, "models": args.models, "images": args.images, "layers": args.layers,
            "heads": args.heads, "metrics": args.metrics, "figures": len(cmp.figures) if args.figures else None,
            "report": None if not args.report else cmp.report is not None,
            "rows": rows, "rows_in_results": written,
            "status": cmp.status, "wall_s": wall, "ray_init_s": init_s, "rows_per_s": rows / wall, "driver_cpu_s": cpu,
            "driver_start_mb": rss0, "driver_peak_mb": driver_mb,
            "driver_sampled_peak_mb": {k: v / 1024 for k, v in sampler.own.items()},  # heap vs mapped object store
            "worker_peak_mb": sorted(workers, reverse=True),
            "other_peak_mb": sorted(((round(mb), name) for mb, name in others.values()), reverse=True),
            "results_bytes": _tree_bytes(out / "results.parquet") if (out / "results.parquet").is_dir()
            else (out / "results.parquet").stat().st_size,
            "parts_bytes": _tree_bytes(out / "parts"), "run_bytes": _tree_bytes(out),
            "outputs_s": (rec.get("timings") or {}).get("outputs_s"),
            "load": os.getloadavg()[0],
        }))
    finally:
        sampler.stop.set()
        if args.engine == "ray":
            import ray

            ray.shutdown()
        shutil.rmtree(out.parent, ignore_errors=True)
        shutil.rmtree(hwm_dir, ignore_errors=True)


# -- the cases ----------------------------------------------------------------------------------------
def _case(args, images: int, engine: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--images", str(images),
           "--models", str(args.models), "--layers", str(args.layers), "--heads", str(args.heads),
           "--metrics", str(args.metrics), "--batch", str(args.batch), "--shard", str(args.shard),
           "--replica-cpus", str(args.replica_cpus), "--tmp", args.tmp,
           *(["--figures"] if args.figures else []), *(["--report"] if args.report else [])]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        raise SystemExit(f"{engine} at {images} images failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


COLUMNS = ["code", "engine", "models x images", "rows", "wall s", "rows/s", "rows per driver CPU s", "driver peak MB",
           "replica peak MB", "other Ray worker peak MB", "Ray system peak MB", "results.parquet MB", "parts MB",
           "load"]


def _row(r: dict) -> dict:
    others = [mb for mb, name in r["other_peak_mb"] if name.startswith("ray::")]  # decoding, Ray Data's actors
    ray_sys = [mb for mb, name in r["other_peak_mb"] if not name.startswith("ray::")]  # GCS, raylet, agents
    engine = r["engine"] + (" + figures" if r.get("figures") is not None else "") + \
        (" + report" if r.get("report") is not None else "")  # drawn with the run's figures, report.html
    return {"code": r.get("code"), "engine": engine, "models x images": f"{r['models']} x {r['images']}",
            "rows": r["rows"], "wall s": round(r["wall_s"], 1),
            "rows/s": round(r["rows_per_s"]),
            "rows per driver CPU s": round(r["rows"] / r["driver_cpu_s"]) if r.get("driver_cpu_s") else None,
            "driver peak MB": round(r["driver_peak_mb"]),
            "replica peak MB": None if not r["worker_peak_mb"] or r["engine"] == "local"
            else f"{round(max(r['worker_peak_mb']))} (x{len(r['worker_peak_mb'])})",
            "other Ray worker peak MB": f"{max(others)} (x{len(others)})" if others else None,
            "Ray system peak MB": max(ray_sys) if ray_sys else None,
            "results.parquet MB": round(r["results_bytes"] / 2**20, 1), "parts MB": round(r["parts_bytes"] / 2**20, 1),
            "load": round(r["load"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--images", default="50000", help="images per model; a comma list runs one case each")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--metrics", type=int, default=2, choices=[1, 2], help="mad, then entropy")
    ap.add_argument("--engine", default="local", help="local, ray, or both comma-separated")
    ap.add_argument("--batch", type=int, default=256, help="the run's batch size (a Ray chunk)")
    ap.add_argument("--shard", type=int, default=4096, help="the Ray engine's shard size, in images")
    ap.add_argument("--replica-cpus", type=float, default=0.05,
                    help="CPUs per Ray replica: every model's replica must fit beside a decoding task")
    ap.add_argument("--figures", action="store_true",
                    help="draw the run's default figures (the run file without figures: []), so the driver's "
                         "peak RSS includes drawing them")
    ap.add_argument("--report", action="store_true",
                    help="write contrasts.csv and report.html too (the explorer's arrays fail on the stand-in model "
                         "and become a note), so the driver's peak RSS includes them")
    ap.add_argument("--tmp", default=None, help="where run directories go (default: the temp folder)")
    ap.add_argument("--json", help="write the table as a benchmark results file (benchmarks/results/)")
    ap.add_argument("--raw", help="append each case's full record to this JSON-lines file")
    ap.add_argument("--label", help="what code the cases ran (e.g. a commit), kept in each record and row")
    ap.add_argument("--from-raw", help="no cases: the table of the records in these JSON-lines files (comma list)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.models > len(_TIMM):
        raise SystemExit(f"--models is at most {len(_TIMM)} (distinct timm specs, so parts do not collide).")
    if args.worker:
        args.images = int(args.images)
        worker(args)
        return
    args.tmp = args.tmp or tempfile.gettempdir()
    rows = []
    if args.from_raw:
        rows = [json.loads(line) for f in args.from_raw.split(",") for line in Path(f).read_text().splitlines()
                if line.strip()]
        args.images = ""
    print("  ".join(f"{c:>14}" for c in COLUMNS))
    for r in rows:
        print("  ".join(f"{str(v):>14}" for v in _row(r).values()))
    for images in [int(x) for x in args.images.split(",") if x]:
        for engine in args.engine.split(","):
            r = {**_case(args, images, engine), "code": args.label}
            rows.append(r)
            if args.raw:
                with open(args.raw, "a") as f:
                    f.write(json.dumps(r) + "\n")
            print("  ".join(f"{str(v):>14}" for v in _row(r).values()), flush=True)
    if args.json:
        from _record import write

        write(args.json, "Result rows at scale: driver and process memory, rows/s (no model)", COLUMNS,
              [_row(r) for r in rows], raw=rows)


if __name__ == "__main__":
    main()
