"""How long the command line takes to answer, and how long a quickstart spends on figures.

    python benchmarks/bench_cli.py              # start-up of --help, models, metrics, typos (best of 5 runs each)
    python benchmarks/bench_cli.py --quickstart # also: a first and a cached quickstart, with the figure share

Each command runs in a fresh process. ``best wall`` is the fastest of the runs (other processes
only ever add time); ``cpu`` is that run's user + system CPU seconds, steadier on a busy machine.
``torch`` says whether the command imported torch (it should not, for the listings and the typos).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["--version"], ["models"], ["metrics"],
            # typos, refused before torch loads (issue 22): a metric, a model, an image folder, a run directory
            ["run", "dino-s16", "--metric", "madd"], ["run", "dino-s1"], ["run", "dino-s16", "--images", "photoz"],
            ["plot", "runz"]]
_PROBE = ("import sys, runpy; sys.argv = ['probekit'] + sys.argv[1:]\n"
          "try:\n    runpy.run_module('probekit.cli', run_name='__main__')\n"
          "except SystemExit:\n    pass\n"
          "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)")


def _run(args: list[str], env: dict) -> tuple[float, float, bool]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    # not from the source tree: `-c` puts the working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, "NOTORCH" not in out.stderr


def startup(repeats: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"{'command':40} {'best wall s':>11} {'cpu s':>7} {'torch':>6}")
    for args in COMMANDS:
        runs = [_run(args, env) for _ in range(repeats)]
        wall, cpu, torch = min(runs)
        print(f"{'probekit ' + ' '.join(args):40} {wall:11.2f} {cpu:7.2f} {str(torch):>6}")


def quickstart() -> None:
    out = Path(tempfile.mkdtemp()) / "quickstart"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for what in ("first run", "cached rerun"):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "probekit.cli", "compare", "configs/quickstart.yaml", "--out", str(out)], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        wall = time.perf_counter() - t
        run = json.loads((out / "run.json").read_text())
        timings = run.get("timings") or {}
        size = (out / "report.html").stat().st_size / 2**20 if (out / "report.html").exists() else float("nan")
        print(f"quickstart {what:13} {wall:6.1f} s  (outputs + figures {timings.get('outputs_s', float('nan')):.1f} s, "
              f"report {timings.get('report_s', float('nan')):.1f} s, report.html {size:.1f} MB)")
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quickstart", action="store_true")
    a = ap.parse_args()
    startup(a.repeats)
    if a.quickstart:
        quickstart()
