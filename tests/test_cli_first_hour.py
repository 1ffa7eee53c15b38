"""The first hour (issue 22, items 15 and 16): `--version`, a run whose every model failed keeps
nothing, no `.lock` is left behind a finished run, and the lock stays exclusive while its file
comes and goes. (Typos failing before torch loads: tests/test_cli_startup.py; which aliases have
weights here: tests/test_listing.py.)"""

from __future__ import annotations

import json
import os

import pytest

import probekit as pk
import probekit.runs.compare
import probekit.runs.rundir as rundir
from probekit.api import compare
from probekit.errors import RunDirBusyError
from probekit.runs.rundir import LOCK, RunDir, load_run_dir

pytestmark = pytest.mark.usefixtures("toy_backend")

RUN = {"name": "hour", "models": ["toy:vit"], "images": {"path": "sample", "count": 2}, "metrics": ["mad"],
       "figures": []}


def test_version_prints_the_installed_version(run_cli):
    r = run_cli("--version")
    assert r.exit_code == 0 and r.stdout == f"probekit {pk.__version__}\n"
    assert pk.__version__ != "0+unknown"  # installed: read from the distribution's metadata


def test_a_run_whose_every_model_failed_leaves_no_run_directory(tmp_path, run_file, run_cli):
    out = tmp_path / "new" / "out"
    cmp = compare(run_file(RUN, models=["toy:missing", {"model": "toy:vit", "label": "broken",
                                                        "options": {"fail_at_batch": 0}}]), out=out)
    assert cmp.status == "failed" and [f.model for f in cmp.failures] == ["toy:missing", "broken"]
    assert len(cmp.results) == 0 and cmp.figures == [] and cmp.report is None
    assert not out.exists() and (tmp_path / "new").is_dir()  # only what the run created is removed
    r = run_cli("run", "toy:missing", "--out", out, "--no-figures")
    assert r.exit_code == 1 and not out.exists()
    said = " ".join(r.stderr.split())
    assert f"Every model failed, so the run kept nothing in {out}" in said
    assert "toy:missing (load): WeightsUnavailableError: toy weights 'missing' are not on this machine." in said
    assert "Wrote" not in said and r.stdout == ""


def test_every_model_failing_in_an_existing_run_directory_leaves_it_as_it_was(tmp_path, run_file):
    out = tmp_path / "out"
    first = compare(run_file(RUN), out=out, figures=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "notes.txt").write_text("mine")  # a user's file beside the run's
    cmp = compare(run_file(RUN, models=["toy:missing"]), out=out, figures=False)
    assert cmp.status == "failed"
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == {**before, **{(out / "notes.txt").relative_to(out): b"mine"}}  # run.json as it was
    assert load_run_dir(out).table.equals(first.results.table)  # still the first run, vouched for
    empty = tmp_path / "empty"
    empty.mkdir()
    compare(run_file(RUN, models=["toy:missing"]), out=empty, figures=False)
    assert empty.is_dir() and list(empty.iterdir()) == []  # a folder that was there stays, as it was


def test_no_lock_file_is_left_behind(tmp_path, run_file, run_cli, monkeypatch):
    out = tmp_path / "out"
    compare(run_file(RUN), out=out)
    assert (out / "run.json").exists() and not (out / LOCK).exists()
    r = run_cli("plot", out, "--kind", "depth")
    assert r.exit_code == 0, r.output
    assert not (out / LOCK).exists()

    def disk_gone(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr(probekit.runs.compare, "write_outputs", disk_gone)  # a run that stops inside the lock
    with pytest.raises(OSError, match="the disk went away"):
        compare(run_file(RUN), out=out, figures=False)
    assert json.loads((out / "run.json").read_text())["status"] == "failed" and not (out / LOCK).exists()


def test_the_lock_stays_exclusive_when_its_file_goes_while_a_run_waits_for_it(tmp_path, monkeypatch):
    """A run that opened `.lock` just before the holder finished (and removed it) must not lock the
    removed file: it takes the new file's lock, which a third run then finds busy."""
    out = tmp_path / "out"
    real = rundir._try_lock
    calls = []

    def holder_finishes_first(fd):
        if not calls:  # between this run's open and its lock, the holder removes the file it locked
            (out / LOCK).unlink()
            calls.append("removed")
        return real(fd)

    monkeypatch.setattr(rundir, "_try_lock", holder_finishes_first)
    with RunDir(out).locked():
        assert calls == ["removed"]
        monkeypatch.setattr(rundir, "_try_lock", real)
        held = json.loads((out / LOCK).read_text())
        assert held["pid"] == os.getpid()  # the file at .lock now is the one this run holds
        with pytest.raises(RunDirBusyError, match=f"pid {os.getpid()}"):
            with RunDir(out).locked():
                pass
        assert (out / LOCK).exists()  # the refused run removed nothing
    assert not (out / LOCK).exists()
    with RunDir(out).locked():  # free again
        pass
