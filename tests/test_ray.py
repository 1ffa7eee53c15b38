"""The Ray engine on a local cluster started here (``ray.init(num_cpus=2)``, no external services).

Two tiny timm ViTs (random init, 32 px, 8 px patches) on 200 generated images in class folders
(and the same images through a manifest): the Ray engine's per-image values equal the local
engine's, with labels; a replica killed by its PID mid-run is restarted by Ray and the tables
still match; a driver interrupted midway leaves finished shards that the rerun does not compute
again. Ray's workers run torch on one thread, so the local reference does too. The bound asserted is
relative 2e-6 (:func:`_close`): a replica's chunks need not be the local engine's batches (a chunk
restarted after a kill, a short last chunk), and a batch of another size may take another path
through float32 reductions (issue 24 states the engines' agreement as relative 2e-6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from PIL import Image

from probekit.api import compare
from probekit.errors import MissingDependencyError

CLASSES = ("circle", "square", "noise", "stripes")
PER_CLASS = 50
RESOURCES = {"cpus": 0.5, "decode_cpus": 0.25, "shard_size": 40}


def _tiny(label: str, depth: int, heads: int) -> dict:
    return {"model": "timm:vit_small_patch16_224", "label": label,
            "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": depth,
                        "num_heads": heads}}


RUN = {"name": "scale", "models": [_tiny("tiny-a", 2, 2), _tiny("tiny-b", 3, 4)], "metrics": ["mad", "entropy"],
       "batch_size": 8, "figures": [], "resources": RESOURCES}
SHARDS = 2 * (len(CLASSES) * PER_CLASS // 40)  # models x shards of 40 images


def _image(kind: str, i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    a = np.full((40, 48, 3), 30 + i % 200, np.uint8)
    if kind == "noise":
        a = rng.integers(0, 255, a.shape, dtype=np.uint8)
    elif kind == "stripes":
        a[:, :: 2 + i % 5] = 255
    else:
        y, x = np.ogrid[:40, :48]
        r = 5 + i % 12
        mask = (y - 20) ** 2 + (x - 24) ** 2 < r * r if kind == "circle" else (abs(y - 20) < r) & (abs(x - 24) < r)
        a[mask] = rng.integers(0, 255, 3)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-images")
    rows = []
    for c in CLASSES:
        (root / "classes" / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            name = f"classes/{c}/{c}-{i:03d}.png"
            _image(c, i).save(root / name)
            rows.append({"path": name, "label": c})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _local(run, out):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in Ray's workers (OMP_NUM_THREADS=1): the same reduction order
    try:
        return compare(run, out=out).results.table
    finally:
        torch.set_num_threads(threads)


def _same(ray_table: pd.DataFrame, local_table: pd.DataFrame) -> None:
    keys = ["model", "image", "layer", "head", "metric", "label"]
    a, b = (t.astype({"model": str, "metric": str, "image": str}) for t in (ray_table, local_table))
    pd.testing.assert_frame_equal(a[keys], b[keys])
    assert len(a) == 2 * len(CLASSES) * PER_CLASS * (2 * 2 + 3 * 4)  # images x (layers x heads) x 2 metrics
    _close(a["value"].to_numpy(), b["value"].to_numpy())


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 reduction order: relative 2e-6 (absolute near 0)."""
    err = np.abs(a - b) / np.maximum(np.abs(b), 1.0)
    assert err.max() <= 2e-6, f"largest relative difference {err.max():.3g}"


class _Killer:
    """A reporter that kills the first replica of tiny-a by its PID once its first shard is in."""

    def __init__(self):
        self.killed = None

    def model_started(self, *a, **k): ...
    def images_done(self, *a, **k): ...
    def model_finished(self, *a, **k): ...
    def model_failed(self, *a, **k): ...

    def shard_done(self, label, shard):
        if label == "tiny-a" and self.killed is None:
            self.killed = shard.pids[0]
            os.kill(self.killed, signal.SIGKILL)


@pytest.mark.ray
@pytest.mark.slow
def test_class_folders_with_a_replica_killed_mid_run_equal_the_local_engine(cluster, data, tmp_path, run_file):
    run = run_file(RUN, images={"kind": "classes", "path": str(data / "classes")})
    local = _local(run, tmp_path / "local")
    killer = _Killer()
    cmp = compare(run, out=tmp_path / "ray", engine="ray", reporter=killer)
    assert cmp.ok and killer.killed is not None
    _same(cmp.results.table, local)
    rec = json.loads((tmp_path / "ray" / "run.json").read_text())
    shards = [s for s in rec["engine"]["shards"] if s["model"] == "tiny-a"]
    assert len(shards) == SHARDS // 2 and all(s["computed"] for s in shards)
    later = {p for s in shards for p in s["pids"]} - {killer.killed}
    assert later, "after the kill, tiny-a's chunks ran in a restarted replica"
    # the run directory has the local engine's layout: whole-set parts only, no shard parts left
    assert sorted(p.name for p in (tmp_path / "ray" / "parts").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "parts").iterdir())


class _Interrupt(_Killer):
    def __init__(self, after: int):
        super().__init__()
        self.after, self.seen = after, 0

    def shard_done(self, label, shard):
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt


@pytest.mark.ray
@pytest.mark.slow
def test_manifest_run_interrupted_midway_recomputes_only_missing_shards(cluster, data, tmp_path, run_file):
    run = run_file(RUN, images={"kind": "manifest", "path": str(data / "manifest.csv")})
    local = _local(run, tmp_path / "local")
    with pytest.raises(KeyboardInterrupt):
        compare(run, out=tmp_path / "ray", engine="ray", reporter=_Interrupt(after=3))
    written = len(list((tmp_path / "ray" / "parts").glob("*.seal.json")))  # one per finished shard x metric
    assert written >= 3 * 2
    cmp = compare(run, out=tmp_path / "ray", engine="ray")
    _same(cmp.results.table, local)
    shards = json.loads((tmp_path / "ray" / "run.json").read_text())["engine"]["shards"]
    computed = sum(s["computed"] for s in shards)
    assert computed + written // 2 == SHARDS and computed < SHARDS  # only the missing ones ran
    assert len(shards) == SHARDS


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch, data, tmp_path, run_file):
    monkeypatch.setitem(sys.modules, "ray", None)
    run = run_file(RUN, images={"kind": "classes", "path": str(data / "classes")})
    with pytest.raises(MissingDependencyError, match=r'pip install "probekit\[ray\]"'):
        compare(run, out=tmp_path / "out", engine="ray")




def _sigterm_after_first_shard(cmd: list[str], parts, env: dict) -> subprocess.CompletedProcess:
    """Run ``cmd``; SIGTERM once the first shard's two parts (mad, cls_map) are sealed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.time() + 300
    while proc.poll() is None and time.time() < end:
        if parts.is_dir() and len(list(parts.glob("*.seal.json"))) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(), err.decode())


# slow (two Ray clusters start in subprocesses): SIGTERM, what SLURM and Kubernetes send, to the driver
@pytest.mark.ray
@pytest.mark.slow
def test_slow_sigterm_to_the_ray_driver_stops_it_as_ctrl_c_does_and_the_rerun_matches(data, tmp_path, run_file):
    from probekit.inputs.view import view_key
    from probekit.results import Results

    run = run_file({"name": "term", "models": [_tiny("tiny-b", 3, 4)],
                    "images": {"kind": "classes", "path": str(data / "classes")}, "metrics": ["mad", "cls_map"],
                    "batch_size": 8, "figures": ["maps"], "resources": RESOURCES}, file="term.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PROBEKIT_DEBUG": "", "RAY_ADDRESS": ""}
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "probekit.cli", "compare", str(run), "--engine", "ray", "--no-report", "--out", str(cut)]
    proc = _sigterm_after_first_shard(cmd, cut / "parts", env)
    assert proc.returncode == 143, proc.stderr[-4000:]
    for dump in ("SIGTERM received at", "Fatal Python error", "Traceback", "SystemExit"):
        assert dump not in proc.stderr, proc.stderr[-4000:]
    said = [ln for ln in proc.stderr.splitlines() if "resume" in ln]
    assert len(said) == 1 and "SIGTERM" in said[0], proc.stderr[-4000:]
    rec = json.loads((cut / "run.json").read_text())
    assert rec["status"] == "interrupted" and rec["error"].startswith("Terminated"), rec.get("error")
    kept = len(list((cut / "parts").glob("*.seal.json")))
    assert 2 <= kept < 2 * 5  # some of the 5 shards x 2 metrics were sealed, not all

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    shards = json.loads((cut / "run.json").read_text())["engine"]["shards"]
    assert sum(not s["computed"] for s in shards) >= 1  # the sealed shards were not computed again
    local = tmp_path / "local"
    _local(run, local)
    a, b = pd.read_parquet(cut / "results.parquet"), pd.read_parquet(local / "results.parquet")
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    _close(a["value"].to_numpy(), b["value"].to_numpy())
    ra, rb = Results.read_arrays(cut / "arrays.npz"), Results.read_arrays(local / "arrays.npz")
    _close(ra["tiny-b/cls_map"], rb["tiny-b/cls_map"])
    np.testing.assert_array_equal(ra[view_key("tiny-b")], rb[view_key("tiny-b")])  # the first 4 images, as seen
    assert (cut / "figures" / "maps_cls_map.png").exists()
