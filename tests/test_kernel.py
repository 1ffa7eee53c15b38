"""The fused Triton kernel's checks (tests/kernel_cases.py), run under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, and torch may import it
early, so the checks run in a child pytest with the variable set: the rest of the suite keeps
the normal triton. A failure there shows its report here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

pytestmark = [pytest.mark.kernel, pytest.mark.slow]  # child processes under Triton's interpreter


def test_kernel_cases_pass_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "kernel_cases.py")],
                         env=env, capture_output=True, text=True, cwd=HERE.parent)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_bench_gpu_dry_run_completes():
    """benchmarks/bench_gpu.py --dry-run: every case and method, the kernel under the interpreter."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "bench_gpu.py"), "--dry-run"], env=env,
                         capture_output=True, text=True, cwd=HERE.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for case in ("vit-b16-224", "vit-b16-448", "vit-l14-518"):
        assert f"{case}: kernel" in out.stdout
    assert out.stdout.count("kernel ") >= 3 and "separate" in out.stdout
