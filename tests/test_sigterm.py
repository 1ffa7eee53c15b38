"""SIGTERM (what SLURM, Kubernetes and `kill` send) stops a run as Ctrl-C does: run.json says
``interrupted``, one line on stderr says how to resume, the exit code is 143 (128 + 15, the
shell's convention; Ctrl-C gives 130), and the same command finishes the run with the numbers an
uninterrupted run gives, to the last bit.

The run is a real ``probekit compare`` process with two DataLoader workers: a tiny random-init
timm ViT, then a slower one on many images; once the first model's parts are sealed and the second
model's workers run, SIGTERM goes to the whole process group, as SLURM sends it.
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
import torch
from PIL import Image

pytest.importorskip("timm")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

MODELS = [{"model": "timm:vit_tiny_patch16_224", "label": "quick",
           "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
          {"model": "timm:vit_tiny_patch16_224", "label": "slow",
           "options": {"pretrained": False, "img_size": 224, "patch_size": 16, "embed_dim": 96, "depth": 6,
                       "num_heads": 2}}]


def _images(folder, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PROBEKIT_DEBUG": ""}


def _children(pid: int) -> list[str]:
    try:
        return open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return []


def _terminate_after_first_part(cmd: list[str], parts, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``cmd``; once ``parts`` holds a sealed part and the next model's DataLoader workers run,
    send SIGTERM to the process group; return the finished process."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    end = time.time() + timeout
    sealed = None
    while proc.poll() is None and time.time() < end:
        if sealed is None and parts.is_dir() and any(parts.glob("*.seal.json")):
            sealed = time.time()
        if sealed is not None and (len(_children(proc.pid)) >= 2 or time.time() > sealed + 5):
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(), err.decode())


@pytest.mark.slow
def test_sigterm_stops_the_run_like_ctrl_c_and_the_rerun_gives_the_same_numbers(tmp_path, run_file):
    _images(tmp_path / "imgs", 60)
    run = run_file(name="term", models=MODELS, images=str(tmp_path / "imgs"), batch_size=2, workers=2)
    cmd = [sys.executable, "-m", "probekit.cli", "compare", str(run), "--no-report"]

    cut = tmp_path / "cut"
    proc = _terminate_after_first_part([*cmd, "--out", str(cut)], cut / "parts")
    assert proc.returncode == 143, proc.stderr[-3000:]
    rec = json.loads((cut / "run.json").read_text())
    assert rec["status"] == "interrupted" and rec["error"].startswith("Terminated"), rec.get("error")
    said = [ln for ln in proc.stderr.splitlines() if "resume" in ln]
    assert len(said) == 1 and "SIGTERM" in said[0] and "run the same command again" in said[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert not (cut / "results.parquet" / "_probekit.json").exists()  # (a finished model's rows may be there)

    done = subprocess.run([*cmd, "--out", str(cut)], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Served from cache: quick" in done.stderr  # the first model's part was kept
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(cut / "results.parquet"),
                                  pd.read_parquet(tmp_path / "whole" / "results.parquet"), check_exact=True)


def test_the_sigterm_handler_is_the_callers_again_after_a_run(tmp_path, toy_backend):
    from probekit.api import compare

    before = signal.getsignal(signal.SIGTERM)
    compare({"models": ["toy:vit"], "images": {"path": "sample", "count": 1}, "metrics": ["mad"],
             "figures": []}, out=tmp_path / "out", report=False)
    assert signal.getsignal(signal.SIGTERM) is before



class _Stuck(torch.utils.data.Dataset):
    """Items past the first two take a minute: a worker is busy when the run stops."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if i >= 2:
            time.sleep(60)
        return torch.zeros(1)


def test_a_stopped_loop_ends_its_busy_workers_though_they_ignore_sigterm():
    """Workers ignore SIGTERM (SLURM signals the whole group), so torch's shutdown (terminate after
    a 5 s join) leaves a busy one running, and multiprocessing's exit hook (terminate, then an
    unbounded join) would wait for it forever: the probe's loop kills what torch's shutdown left."""
    from probekit.engine import probe as engine

    loader = torch.utils.data.DataLoader(_Stuck(), batch_size=1, num_workers=2,
                                         worker_init_fn=engine._leave_sigterm_to_the_run)
    batches = engine._batches(loader)
    next(batches)
    workers = list(batches._workers)
    t0 = time.perf_counter()
    engine._close(batches)
    assert [w.is_alive() for w in workers] == [False, False]
    assert time.perf_counter() - t0 < 30


def test_a_signal_while_the_loaders_queues_are_in_use_is_delivered_right_after():
    """A handler that raises inside multiprocessing.Queue.put would leave the queue's lock taken and
    the loader's shutdown waiting on it forever (a SIGTERM'd run that never exited): the engine holds
    SIGTERM and SIGINT while it uses the loader, then hands them to the handler that was installed."""
    from probekit.engine import probe as engine

    calls: list[str] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append("handler"))
    try:
        with engine._signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            calls.append("block done")
        assert calls == ["block done", "handler"]
        assert signal.getsignal(signal.SIGTERM) is not engine._signals_deferred  # the caller's handler is back
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert calls == ["block done", "handler", "handler"]
    finally:
        signal.signal(signal.SIGTERM, before)
