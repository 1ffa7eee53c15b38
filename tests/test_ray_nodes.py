"""The Ray engine losing a node mid-run (issue 24, item 4), and its stall bound.

The slow test starts a real two-node Ray cluster on this machine: a head and a second node, each
a ``ray start --block`` process of one CPU bound to 127.0.0.1 in its own session and temp
folder. A probekit driver (the CLI, in a subprocess with a timeout) runs two tiny random-init ViTs
on it with the default resource plan; once the second node holds one of the replicas (or a first
shard is sealed) the test kills every process of that node's session. The run must then finish
equal to the local engine (relative 2e-6), or fail in one line within its stall bound and finish
equal to it when run again. Every process the test started is killed at the end, also on failure.

The fast tests check the pieces without Ray: the stall watch on a fake clock and a fake progress
source, and the CPU plan's closed form.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from probekit.runs.engines.ray import _cpu_share, _stalled
from probekit.runs.engines.stall import FACTOR, FLOOR, RunStalledError, StallWatch, next_or_stall


# -- the stall watch and the CPU plan (fast, no Ray) ---------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_stall_bound_covers_start_up_then_scales_with_the_longest_wait():
    clock = _Clock()
    w = StallWatch(None, clock)
    assert w.bound == FLOOR and w.left() == FLOOR
    clock.t += 250.0  # start-up: the first wait never scales the bound
    w.progressed()
    assert w.longest == 0.0 and w.bound == FLOOR
    clock.t += 40.0
    w.progressed()
    assert w.longest == 40.0 and w.bound == FACTOR * 40.0
    clock.t += 399.0
    assert w.waited() == 399.0 and w.left() == pytest.approx(1.0)
    clock.t += 1.0
    assert w.left() == 0.0

    fixed = StallWatch(20.0, clock)
    assert fixed.bound == FLOOR  # before the first chunk: at least the floor
    fixed.progressed()
    clock.t += 500.0
    fixed.progressed()
    assert fixed.bound == 20.0  # then the run file's bound, however long the waits were


def test_next_or_stall_returns_progress_then_fails_within_the_bound():
    q: queue.Queue = queue.Queue()
    w = StallWatch(0.3)
    w.progressed()  # (past start-up)

    def source():  # a fake progress source: five chunks 50 ms apart, then nothing
        for i in range(5):
            time.sleep(0.05)
            q.put(i)

    threading.Thread(target=source, daemon=True).start()
    got = [next_or_stall(q, w, lambda s: RunStalledError(f"{s:.2f}"), poll=0.05) for _ in range(5)]
    assert got == [0, 1, 2, 3, 4] and w.events == 6
    t0 = time.monotonic()
    with pytest.raises(RunStalledError) as err:
        next_or_stall(q, w, lambda s: RunStalledError(f"{s:.2f}"), poll=0.05)
    took = time.monotonic() - t0
    assert 0.3 <= float(str(err.value)) < 0.3 + 0.5 and took < 0.3 + 0.5


def test_stall_message_is_one_line_saying_what_is_kept_and_how_to_resume(tmp_path):
    jobs = [SimpleNamespace(have={0: {}, 1: {}}), SimpleNamespace(have={})]
    res = {"cpus": 1 / 3, "gpus": 0.0, "decode_cpus": 1 / 3}
    w = StallWatch(60.0)
    w.progressed()
    err = _stalled(61.4, w, jobs, [(0, 8), (8, 16), (16, 20)], SimpleNamespace(folder=tmp_path / "parts"), res)
    text = str(err)
    assert "\n" not in text and isinstance(err, RunStalledError)
    assert "no progress for 61 s (bound 60 s, resources.stall_s)" in text
    assert f"2 of 6 shards sealed in {tmp_path / 'parts'}" in text
    assert "0.333 CPU, 0 GPU each" in text and text.endswith("run the same command again to resume from the "
                                                            "sealed shards.")


def test_cpu_plan_leaves_a_decoding_slot_on_every_node_whatever_is_lost():
    two = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert _cpu_share(two, 2, 0.0) == pytest.approx(1 / 3)  # two replicas and a decoding task on one CPU
    assert _cpu_share([{"CPU": 4.0}, {"CPU": 2.0}], 3, 0.0) == pytest.approx(2 / 4)
    assert _cpu_share([{"CPU": 64.0}], 2, 0.0) == 1.0  # at most one CPU each
    assert _cpu_share([{"CPU": 0.0}, {"CPU": 3.0}], 2, 0.0) == 1.0  # a head without CPUs takes no work
    # GPU plan: a node holds as many replicas as its GPUs allow; a CPU-only node decodes only
    assert _cpu_share([{"CPU": 8.0, "GPU": 8.0}, {"CPU": 2.0}], 8, 1.0) == pytest.approx(8 / 9)
    assert _cpu_share([{"CPU": 4.0, "GPU": 2.0}], 8, 0.5) == pytest.approx(4 / 5)
    for nodes, actors in ((two, 2), ([{"CPU": 3.0}, {"CPU": 1.5}], 5)):
        share = _cpu_share(nodes, actors, 0.0)
        assert all(actors * share + share <= n["CPU"] + 1e-12 for n in nodes)


# -- a real two-node cluster on this machine (slow) ----------------------------------------------
CLASSES, PER_CLASS = ("a", "b"), 24
BOUND = 60.0  # resources.stall_s of the run
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PROBEKIT_DEBUG": "", "RAY_ADDRESS": ""}


def _tiny(label: str, depth: int, heads: int) -> dict:
    return {"model": "timm:vit_small_patch16_224", "label": label,
            "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": depth,
                        "num_heads": heads}}


def _ray_bin() -> str:
    near = Path(sys.executable).with_name("ray")
    found = str(near) if near.exists() else shutil.which("ray")
    assert found, "the ray command is not installed next to this Python"
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` (a node started with start_new_session: all its processes)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(d.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_session(proc: subprocess.Popen) -> None:
    for pid in _session(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


class _Cluster:
    """A head and a second node, one CPU each, on 127.0.0.1; every process killed on close."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="pkn", dir="/tmp"))  # short: Ray's socket paths
        self.address = f"127.0.0.1:{_free_port()}"
        self.env = {**os.environ, **RAY_ENV}
        self.nodes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115  (the node's, for as long as it runs)
        cmd = [_ray_bin(), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
               "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
               "--temp-dir", str(self.root / name), *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        end = time.monotonic() + 120
        while "Ray runtime started" not in (self.root / f"{name}.log").read_text():
            assert proc.poll() is None and time.monotonic() < end, (self.root / f"{name}.log").read_text()[-3000:]
            time.sleep(0.2)
        return proc

    def start(self, monkeypatch) -> None:
        import ray

        self._start("head", "--head", "--port", self.address.rsplit(":", 1)[1], "--include-dashboard", "false",
                    "--system-config", '{"health_check_period_ms": 500, "health_check_failure_threshold": 4}')
        self.second = self._start("second", "--address", self.address)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(address=self.address, log_to_driver=False)  # until the head counts both nodes
        try:
            end = time.monotonic() + 60
            while ray.cluster_resources().get("CPU", 0) < 2:
                assert time.monotonic() < end, f"the second node did not join: {ray.cluster_resources()}"
                time.sleep(0.2)
        finally:
            ray.shutdown()

    def close(self) -> None:
        for proc in reversed(self.nodes):
            _kill_session(proc)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def two_nodes(monkeypatch):
    cluster = _Cluster()
    try:
        cluster.start(monkeypatch)
        yield cluster
    finally:
        cluster.close()


def _images(root: Path) -> Path:
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            rng = np.random.default_rng(1000 * CLASSES.index(c) + i)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{c}{i:02d}.png")
    return root


def _local(run: Path, out: Path) -> pd.DataFrame:
    import torch

    from probekit.api import compare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in Ray's workers (OMP_NUM_THREADS=1): the same reduction order
    try:
        compare(run, out=out, figures=False, report=False)
    finally:
        torch.set_num_threads(threads)
    return pd.read_parquet(out / "results.parquet")


def _equal(ray_dir: Path, local: pd.DataFrame) -> None:
    a = pd.read_parquet(ray_dir / "results.parquet")
    pd.testing.assert_frame_equal(a.drop(columns="value"), local.drop(columns="value"))
    assert len(a) == len(CLASSES) * PER_CLASS * (2 * 2 + 3 * 4)  # images x (layers x heads) of both models
    np.testing.assert_allclose(a["value"].to_numpy(), local["value"].to_numpy(), rtol=2e-6, atol=1e-9)


@pytest.mark.ray
@pytest.mark.slow
def test_slow_losing_a_node_mid_run_finishes_equal_to_local_or_fails_in_one_line_and_resumes(
        two_nodes, tmp_path, run_file):
    run = run_file({"name": "nodes", "models": [_tiny("tiny-a", 2, 2), _tiny("tiny-b", 3, 4)],
                    "images": {"kind": "classes", "path": str(_images(tmp_path / "images"))}, "metrics": ["mad"],
                    "batch_size": 4, "figures": [], "address": two_nodes.address,
                    "resources": {"shard_size": 8, "stall_s": BOUND}}, file="nodes.yaml")
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "probekit.cli", "compare", str(run), "--engine", "ray", "--no-report",
           "--out", str(out)]
    driver = subprocess.Popen(cmd, env=two_nodes.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held, killed_at, lost = False, None, []
        end = time.monotonic() + 300
        while driver.poll() is None and killed_at is None and time.monotonic() < end:
            lost = _session(two_nodes.second.pid)
            held = any("ProbeReplica" in _cmdline(p) for p in lost)
            if held or len(list((out / "parts").glob("*.seal.json"))) >= 1:
                _kill_session(two_nodes.second)
                killed_at = time.monotonic()
            time.sleep(0.1)
        assert killed_at is not None, f"the run ended before the second node was stopped: {driver.poll()}"
        _, err = driver.communicate(timeout=BOUND + 180)  # the bound, then stopping and recording
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    waited = time.monotonic() - killed_at
    rec = json.loads((out / "run.json").read_text())
    assert rec["engine"]["cluster"]["CPU"] == 2.0, err[-4000:]  # both nodes were in the plan
    assert rec["engine"]["cpus"] == pytest.approx(1 / 3) and rec["engine"]["decode_cpus"] == pytest.approx(1 / 3)
    shard_pids = {p for s in rec["engine"]["shards"] for p in s["pids"]}
    assert held or shard_pids & set(lost), "the lost node held neither a replica nor a shard's work"
    local = _local(run, tmp_path / "local")
    print(f"node lost {'holding a replica' if held else 'after a first shard'}; the run "
          f"{'finished' if driver.returncode == 0 else 'failed'} {waited:.0f} s later")  # (pytest -s shows it)
    if driver.returncode == 0:
        assert rec["status"] == "complete", err[-4000:]
        _equal(out, local)
        return
    said = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert driver.returncode == 1 and len(said) == 1, err[-4000:]
    assert "made no progress" in said[0] and "run the same command again to resume" in said[0], said[0]
    assert "Traceback" not in err, err[-4000:]
    assert waited < BOUND + 120, waited  # within the bound (and the time to stop and record)
    assert rec["status"] == "failed" and rec["error"].startswith("RunStalledError")
    again = subprocess.run(cmd, env=two_nodes.env, capture_output=True, text=True, timeout=BOUND + 240)
    assert again.returncode == 0, again.stderr[-4000:]
    shards = json.loads((out / "run.json").read_text())["engine"]["shards"]
    assert any(not s["computed"] for s in shards)  # the sealed shards were not computed again
    _equal(out, local)
