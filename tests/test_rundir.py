"""Run directories: one run's files with a manifest that readers verify, the lock, write errors.

Each test interrupts or damages a run the way the issue found it broken (a second run into the
same directory killed during its final writes, two runs at once, a full disk, a read-only
folder) and checks what the directory then says. Models are the toy ViT of tests/_toy.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import probekit.runs.rundir
from probekit.api import compare
from probekit.errors import RunDirBusyError, RunDirError, WriteError
from probekit.runs.rundir import RunDir, load_run_dir, read_record

pytestmark = pytest.mark.usefixtures("toy_backend")

RUN = {"name": "dir", "models": [{"model": "toy:vit", "label": "toy"}], "images": {"path": "sample", "count": 3},
       "metrics": ["mad"], "batch_size": 3, "figures": []}


def _status(d: Path) -> str:
    return json.loads((d / "run.json").read_text())["status"]


def test_a_finished_run_vouches_for_its_files_and_a_changed_file_is_refused(tmp_path, run_file):
    out = tmp_path / "out"
    cmp = compare(run_file(RUN, figures=["depth"]), out=out)
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and len(rec["run_id"]) == 12
    assert sorted(rec["manifest"]) == ["contrasts.csv", "figures/depth_mad.png", "figures/depth_mad.svg",
                                       "report.html", "results.parquet/_probekit.json",
                                       "results.parquet/model=toy/metric=mad/part-00000.parquet", "summary.csv"]
    pd.testing.assert_frame_equal(load_run_dir(out).table, cmp.results.table)
    summary = out / "summary.csv"
    summary.write_text(summary.read_text().replace("toy", "tOy"))
    with pytest.raises(RunDirError, match=r"summary.csv is not the file run \w+ wrote \(changed since\)"):
        load_run_dir(out)


def test_a_second_run_interrupted_during_its_final_writes_never_leaves_complete(tmp_path, monkeypatch, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN), out=out)
    first_id = read_record(out).run_id
    real = probekit.runs.rundir.write_text_atomic

    def ctrl_c_at_summary(path, text):
        if Path(path).name == "summary.csv":
            raise KeyboardInterrupt  # Ctrl-C after results.parquet, before summary.csv
        return real(path, text)

    monkeypatch.setattr(probekit.runs.rundir, "write_text_atomic", ctrl_c_at_summary)
    with pytest.raises(KeyboardInterrupt):
        compare(run_file(RUN, metrics=["mad", "entropy"]), out=out)  # one more metric
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "interrupted" and rec["run_id"] != first_id and "manifest" not in rec
    assert sorted(rec["metrics"]) == ["entropy", "mad"]
    # results.parquet is the new run's, summary.csv the old one's: a reader must refuse both
    assert set(pd.read_parquet(out / "results.parquet")["metric"]) == {"mad", "entropy"}
    assert set(pd.read_csv(out / "summary.csv")["metric"]) == {"mad"}
    with pytest.raises(RunDirError, match=r"holds an unfinished run \(run.json status 'interrupted'"):
        load_run_dir(out)
    monkeypatch.undo()
    again = compare(run_file(RUN, metrics=["mad", "entropy"]), out=out)
    assert again.cached == ["toy"] and _status(out) == "complete"
    assert set(load_run_dir(out).metrics) == {"mad", "entropy"}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.slow
def test_sigkill_during_the_final_writes_leaves_running_and_the_rerun_finishes(tmp_path, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN), out=out)
    script = f"""
import os, signal, importlib.util
spec = importlib.util.spec_from_file_location("toy", {str(Path(__file__).with_name("_toy.py"))!r})
toy = importlib.util.module_from_spec(spec); spec.loader.exec_module(toy); toy.load_toy()
import probekit as pk, probekit.runs.rundir as rundir
real = rundir.write_text_atomic
def kill_at_summary(path, text):
    if str(path).endswith("summary.csv"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, text)
rundir.write_text_atomic = kill_at_summary
pk.compare({str(run_file(RUN, metrics=["mad", "entropy"], file="two.yaml"))!r}, out={str(out)!r})
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert _status(out) == "running"
    with pytest.raises(RunDirError, match="holds an unfinished run"):
        load_run_dir(out)  # the killed process released the lock: not "in progress"
    compare(tmp_path / "two.yaml", out=out)  # the lock of the dead process is taken over
    assert _status(out) == "complete" and set(load_run_dir(out).metrics) == {"mad", "entropy"}


def test_figures_of_an_earlier_run_do_not_stay_beside_new_results(tmp_path, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN, metrics=["mad", "entropy"], figures=["depth"]), out=out)
    assert len(list((out / "figures").iterdir())) == 4
    compare(run_file(RUN, metrics=["mad"], figures=["depth"]), out=out)
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["depth_mad.png", "depth_mad.svg"]


def test_a_second_run_on_the_same_directory_is_refused_saying_who_holds_it(tmp_path, run_file):
    out = tmp_path / "out"
    with RunDir(out).locked():  # another run, e.g. in a second terminal
        with pytest.raises(RunDirBusyError) as info:
            compare(run_file(RUN), out=out)
    msg = str(info.value)
    assert f"{out} is in use by another probekit run (pid {os.getpid()} on " in msg
    assert "Wait for it to finish, or choose another --out" in msg
    assert not (out / "run.json").exists()  # nothing of the refused run was written
    compare(run_file(RUN), out=out)  # released: the next run goes ahead
    assert _status(out) == "complete"


def test_a_read_only_out_is_one_line_saying_what_to_do(tmp_path, monkeypatch, run_file):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = Path.mkdir

    def refused(self, *a, **kw):  # a read-only mount (chmod does not stop root, who runs CI)
        if str(self).startswith(str(ro)):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(WriteError, match=r"Cannot write .*ro/out \(Read-only file system\)\. Choose a writable "
                                         r"output directory \(--out\)"):
        compare(run_file(RUN), out=ro / "out")
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(WriteError, match=r"Cannot write .*a-file .*Choose a writable output directory"):
        compare(run_file(RUN), out=tmp_path / "a-file")


def test_a_full_disk_while_writing_results_is_one_error_and_the_temp_cleanup_hides_nothing(tmp_path, monkeypatch, run_file):
    import pyarrow.parquet as pq

    out = tmp_path / "out"

    def full(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    real_unlink = Path.unlink

    def unlink_fails(self, missing_ok=False):
        if ".tmp" in self.name:  # removing the temporary file fails too
            raise PermissionError(errno.EACCES, "cleanup refused")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pq, "write_table", full)
    monkeypatch.setattr(Path, "unlink", unlink_fails)
    with pytest.raises(WriteError, match=r"No space left to write .*parts.*\.parquet \(No space left on device\)\. "
                                         r"Free some space") as info:
        compare(run_file(RUN), out=out)
    assert info.value.__cause__.errno == errno.ENOSPC  # the original error, not the failed cleanup
    monkeypatch.undo()
    assert _status(out) == "failed"  # not complete, not a leftover of an earlier run


def test_a_full_disk_while_drawing_figures_leaves_no_figure_and_exits_1(tmp_path, monkeypatch, run_file):
    from typer.testing import CliRunner

    import matplotlib.figure

    from probekit.cli import app

    out = tmp_path / "out"
    real = matplotlib.figure.Figure.savefig
    calls = []

    def full_after_two(self, fname, **kw):
        calls.append(fname)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fname, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_after_two)
    monkeypatch.delenv("PROBEKIT_DEBUG", raising=False)
    r = CliRunner().invoke(app, ["compare", str(run_file(RUN, figures=["depth", "overlay"])), "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert "No figures: WriteError: No space left to write" in " ".join(r.stderr.split())
    assert f"probekit plot {out}" in " ".join(r.stderr.split())
    assert len(calls) == 3 and not list((out / "figures").iterdir())  # two were drawn, none is left
    assert not [p for p in out.iterdir() if p.name.startswith(".figures")]
    rec = read_record(out)  # the numbers are written and vouched for
    assert rec.figures == [] and "No space left" in rec.figure_error
