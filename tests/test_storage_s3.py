"""Run directories in an object store (``--out s3://...``), against a real S3 server: moto's server
mode on 127.0.0.1 (HTTP, conditional writes included), reached through boto3 as any S3 is; and the
storage layer's calls on a local folder, which must answer the same.
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from probekit._io.storage import LocalStorage, S3Storage, storage_for
from probekit.api import compare
from probekit.errors import ConfigError, RunDirBusyError, RunDirError
from probekit.runs import lease as lease_mod
from probekit.runs.lease import Lease
from probekit.runs.rundirs import load_run_dir, read_record

BUCKET = "probekit-test"
TOY_A = {"model": "toy:vit", "label": "toy-a", "training": "self-supervised"}
TOY_B = {"model": "toy:vit", "label": "toy-b", "options": {"depth": 3, "heads": 4}}
RUN = {"name": "tiny", "models": [TOY_A, TOY_B], "images": {"path": "sample", "count": 4, "seed": 1},
       "metrics": ["mad"], "batch_size": 3, "figures": ["depth"]}


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free port of 127.0.0.1, for this module."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # (a line per request otherwise)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the server, with boto3 pointed at it through the standard AWS variables;
    returns a boto3 client for the test's own checks."""
    import uuid

    import boto3

    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    bucket = f"{BUCKET}-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def _keys(client, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=client.bucket, Prefix=prefix).get("Contents", []))


def _sha(client, key: str) -> str:
    import hashlib

    return hashlib.sha256(client.get_object(Bucket=client.bucket, Key=key)["Body"].read()).hexdigest()


# -- the storage layer: the same answers from a local folder and from S3 -----------------------------
@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    client = request.getfixturevalue("s3")
    return storage_for(f"s3://{client.bucket}/root")


def test_storage_create_swap_delete_list(storage):
    tag = storage.create("a/x.json", b"one")
    assert tag is not None and storage.read("a/x.json") == b"one"
    assert storage.create("a/x.json", b"two") is None  # create-only: the first write stays
    assert storage.read("a/x.json") == b"one"
    assert storage.swap("a/x.json", b"three", "not-its-tag") is None  # compare-and-swap refuses a stale tag
    new = storage.swap("a/x.json", b"three", tag)
    assert new is not None and new != tag and storage.read_tagged("a/x.json") == (b"three", new)
    assert storage.swap("a/x.json", b"four", tag) is None  # the old version's tag no longer swaps
    assert storage.swap("nothing.json", b"x", tag) is None
    storage.put("b.bin", bytes(range(256)))
    assert storage.list() == ["a/x.json", "b.bin"] and storage.list("a") == ["a/x.json"]
    assert storage.exists("b.bin") and not storage.exists("a")
    assert not storage.delete("a/x.json", tag)  # only the version named
    assert storage.delete("a/x.json", new) and not storage.exists("a/x.json")
    assert not storage.delete("a/x.json")
    with pytest.raises(FileNotFoundError):
        storage.read("a/x.json")
    assert storage.child("a").list() == [] and storage.child("q").create("z", b"z") is not None
    assert storage.list() == ["b.bin", "q/z"]


def test_storage_refuses_stores_without_conditional_writes(tmp_path):
    with pytest.raises(ConfigError, match="gs:// store is not supported"):
        storage_for("gs://bucket/run")
    assert isinstance(storage_for(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(storage_for("s3://bucket/a/b"), S3Storage)
    assert storage_for("s3://bucket/a/b/").child("c").uri("d") == "s3://bucket/a/b/c/d"


def _part(model: str, values: list[float]):
    import numpy as np

    from probekit.results import Results

    table = pd.DataFrame({"model": model, "image": [f"i{k}" for k in range(len(values))], "layer": 0, "head": 0,
                          "metric": "mad", "value": values})
    return Results(table, arrays={f"{model}/maps": np.arange(6, dtype=np.float32).reshape(2, 3)},
                   meta={"model": model})


def test_stored_parts_round_trip_and_refuse_a_damaged_part(storage, tmp_path):
    from probekit.runs.remote import StoredParts

    parts = StoredParts(storage.child("parts"), tmp_path / "work")
    assert parts.read("k1") is None
    parts.write("k1", _part("m", [1.5, 2.5]))
    got = parts.read("k1")
    assert got is not None and got.table["value"].tolist() == [1.5, 2.5]
    assert got.arrays["m/maps"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert storage.list("parts") == ["parts/k1.npz", "parts/k1.parquet", "parts/k1.seal.json"]
    data = bytearray(storage.read("parts/k1.parquet"))
    data[len(data) // 2] ^= 1  # one flipped bit: the seal no longer matches, so the part is recomputed
    storage.put("parts/k1.parquet", bytes(data))
    assert parts.read("k1") is None
    parts.discard("k1")
    assert storage.list("parts") == []


def test_stored_parts_join_shard_parts_into_one(storage, tmp_path):
    from probekit.runs.remote import StoredParts

    parts = StoredParts(storage.child("parts"), tmp_path / "work")
    parts.write("s0", _part("m", [1.0, 2.0]))
    parts.write("s1", _part("m", [3.0]))
    whole = _part("m", [])
    whole.meta["engine"] = "ray"
    parts.write_joined("w", ["s0", "s1"], whole)  # rows of the shards in order, arrays and meta of ``whole``
    got = parts.read("w")
    assert got is not None and got.table["value"].tolist() == [1.0, 2.0, 3.0]
    assert got.table["image"].tolist() == ["i0", "i1", "i0"] and got.meta["engine"] == "ray"
    assert "m/maps" in got.arrays


# -- the lease ----------------------------------------------------------------------------------
def test_lease_refuses_a_second_holder_and_takes_over_an_expired_one(storage, monkeypatch):
    first = Lease(storage, ttl=60)
    first.acquire()
    with pytest.raises(RunDirBusyError, match=r"in use by another probekit run \(pid \d+ on"):
        Lease(storage, ttl=60).acquire()
    first._stop.set()  # its run dies: no more renewals, and nobody deletes the lock
    first._beat.join()
    held = json.loads(storage.read(".lock"))
    with pytest.raises(RunDirBusyError):  # not expired yet
        Lease(storage, ttl=60).acquire()
    monkeypatch.setattr(lease_mod, "_now", lambda: held["expires"] + 1)  # now past its expiry
    second = Lease(storage, ttl=60)
    with pytest.warns(RuntimeWarning, match=f"took over the lock of a run that stopped renewing it \\(pid {held['pid']}"):
        second.acquire()
    assert json.loads(storage.read(".lock"))["run"] == second.me["run"]
    monkeypatch.undo()
    # the first run learns it lost the lock at its next renewal, and may no longer write its record
    first._stop.clear()
    first.ttl = 0.03
    first._renew()  # (returns once its swap is refused)
    with pytest.raises(RunDirBusyError, match="taken over by another run"):
        first.check()
    first.release()  # leaves the new holder's lock alone
    assert json.loads(storage.read(".lock"))["run"] == second.me["run"]
    second.release()
    assert not storage.exists(".lock")


def test_lease_renews_while_held(storage):
    lease = Lease(storage, ttl=0.3)
    lease.acquire()
    try:
        first = json.loads(storage.read(".lock"))["expires"]
        deadline = time.monotonic() + 10  # (a renewal every 0.1 s; a loaded machine may delay a few)
        while json.loads(storage.read(".lock"))["expires"] <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(storage.read(".lock"))["expires"] > first
        lease.check()
    finally:
        lease.release()


# -- a run directory in S3 ------------------------------------------------------------------------
@pytest.mark.slow
def test_s3_run_writes_resumes_reads_back_and_reports(tmp_path, s3, loads, run_file):
    path = run_file(RUN)
    uri = f"s3://{s3.bucket}/runs/one"
    s3.put_object(Bucket=s3.bucket, Key="runs/notes.txt", Body=b"a user's file beside the run")
    s3.put_object(Bucket=s3.bucket, Key="runs/one-other/keep.txt", Body=b"a prefix that only starts the same")
    local = compare(path, out=tmp_path / "local", figures=False, report=False)  # the same run, on a folder
    loads.calls.clear()
    loads.state["interrupt_at"] = 2  # Ctrl-C while the second model loads
    with pytest.raises(KeyboardInterrupt):
        compare(path, out=uri)
    record = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/one/run.json")["Body"].read())
    assert record["status"] == "interrupted"
    assert len([k for k in _keys(s3, "runs/one/parts/") if k.endswith(".seal.json")]) == 1  # the first model's
    with pytest.raises(RunDirError, match="holds an unfinished run"):
        load_run_dir(uri)
    loads.state["interrupt_at"] = None
    loads.calls.clear()
    cmp = compare(path, out=uri)
    assert loads.calls == ["toy-b"]  # resumed from the sealed part in the store
    assert cmp.run_dir == uri and cmp.report == f"{uri}/report.html"
    assert cmp.status == "complete" and not cmp.failures
    pd.testing.assert_frame_equal(cmp.results.table, local.results.table, check_exact=True)  # read after the run
    back = load_run_dir(uri)
    pd.testing.assert_frame_equal(back.table, local.results.table, check_exact=True)
    pd.testing.assert_frame_equal(back.summary(), local.results.summary(), check_exact=True)
    record = read_record(uri)
    keys = _keys(s3, "runs/one/")
    for name in ("summary.csv", "report.html", "contrasts.csv", "figures/depth_mad.png"):
        assert f"runs/one/{name}" in keys and name in record.manifest
    html = s3.get_object(Bucket=s3.bucket, Key="runs/one/report.html")["Body"].read().decode()
    assert "toy-a" in html and "toy-b" in html
    assert "runs/one/.lock" not in keys  # released
    # nothing outside the run prefix was touched
    assert s3.get_object(Bucket=s3.bucket, Key="runs/notes.txt")["Body"].read() == b"a user's file beside the run"
    assert _keys(s3, "runs/one-other/") == ["runs/one-other/keep.txt"]
    # probekit report and plot rewrite the report and draw figures into the store, and join the manifest
    from typer.testing import CliRunner

    from probekit.cli import app

    before = s3.head_object(Bucket=s3.bucket, Key="runs/one/report.html")["LastModified"]
    time.sleep(1.1)  # (S3 times have whole seconds)
    r = CliRunner().invoke(app, ["plot", uri, "--kind", "depth"])
    assert r.exit_code == 0, r.output
    assert f"{uri}/figures/depth_mad.svg" in r.output
    r = CliRunner().invoke(app, ["report", uri])
    assert r.exit_code == 0, r.output
    assert f"{uri}/report.html" in r.output
    assert s3.head_object(Bucket=s3.bucket, Key="runs/one/report.html")["LastModified"] > before  # written again
    record = read_record(uri)  # every file matches the manifest again, the redrawn figure included
    assert record.manifest["figures/depth_mad.svg"] == _sha(s3, "runs/one/figures/depth_mad.svg")
    assert "runs/one/.lock" not in _keys(s3, "runs/one/")
    # a changed object is caught by the manifest
    s3.put_object(Bucket=s3.bucket, Key="runs/one/summary.csv", Body=b"model\n")
    with pytest.raises(RunDirError, match="summary.csv is not the file run"):
        load_run_dir(uri)


@pytest.mark.slow
def test_s3_run_is_refused_while_locked_and_on_a_users_prefix(tmp_path, s3, loads, run_file):
    path = run_file(RUN, models=[TOY_A], figures=[])
    uri = f"s3://{s3.bucket}/busy"
    holder = Lease(storage_for(uri), ttl=60)
    holder.acquire()
    try:
        with pytest.raises(RunDirBusyError, match=f"{uri} is in use by another probekit run"):
            compare(path, out=uri, report=False)
    finally:
        holder.release()
    assert _keys(s3, "busy/") == []  # the refused run wrote nothing
    # the lock of a run that died (never renewed, now past its expiry) is taken over, saying whose
    stale = {"pid": 4242, "host": "gone-node", "started": "2026-01-01T00:00:00+00:00", "expires": time.time() - 1}
    s3.put_object(Bucket=s3.bucket, Key="busy/.lock", Body=json.dumps(stale).encode())
    with pytest.warns(RuntimeWarning, match="took over the lock .*pid 4242 on gone-node"):
        cmp = compare(path, out=uri, report=False)
    assert cmp.status == "complete" and loads.calls == ["toy-a"]
    assert "busy/.lock" not in _keys(s3, "busy/") and read_record(uri).status == "complete"
    loads.calls.clear()
    # a run whose every model failed keeps nothing: the prefix is left as the finished run left it,
    # and a new prefix is left empty
    before = {k: s3.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in _keys(s3, "busy/")}
    failed = run_file(RUN, models=["toy:missing"], figures=[], file="missing.yaml")
    assert compare(failed, out=uri, report=False).status == "failed"
    assert {k: s3.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in _keys(s3, "busy/")} == before
    assert compare(failed, out=f"s3://{s3.bucket}/fresh", report=False).status == "failed"
    assert _keys(s3, "fresh/") == []
    loads.calls.clear()
    s3.put_object(Bucket=s3.bucket, Key="mine/data.csv", Body=b"x")
    with pytest.raises(RunDirError, match="holds objects but is not a probekit run directory"):
        compare(path, out=f"s3://{s3.bucket}/mine", report=False)
    assert _keys(s3, "mine/") == ["mine/data.csv"]
    assert loads.calls == []


def test_run_json_is_replaced_only_over_the_runs_own_version_and_never_after_losing_the_lock(s3, monkeypatch):
    from probekit.runs.record import ImagesRecord, RunRecord
    from probekit.runs.remote import RemoteRunDir
    from probekit.runs.rundirs import open_run_dir

    monkeypatch.setattr(lease_mod, "LOCK_TTL_S", 0.3)  # (renewed every 0.1 s)
    uri = f"s3://{s3.bucket}/cas"
    rd = open_run_dir(uri)
    assert isinstance(rd, RemoteRunDir) and rd.where == uri

    def run_json() -> dict:
        return json.loads(s3.get_object(Bucket=s3.bucket, Key="cas/run.json")["Body"].read())

    with rd.locked():
        record = rd.begin(RunRecord(status="new", images=ImagesRecord(count=0, fingerprint="f", names=[])))
        assert run_json()["status"] == "running"
        other = {"run_id": "other", "status": "running"}  # someone writes run.json behind the lock's back
        s3.put_object(Bucket=s3.bucket, Key="cas/run.json", Body=json.dumps(other).encode())
        with pytest.raises(RunDirError, match="was changed by someone else while this run held the lock"):
            rd.write_record(record)
        assert run_json() == other
        # another run takes the lock over: this run learns it at its next renewal and writes nothing more
        s3.put_object(Bucket=s3.bucket, Key="cas/.lock", Body=b'{"run": "other"}')
        deadline = time.monotonic() + 10
        while not rd._lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RunDirBusyError, match="lock was taken over by another run"):
            rd.write_record(record)
        rd.abandon(record, KeyboardInterrupt())  # (nothing: run.json is the other run's)
        assert run_json() == other
    assert s3.get_object(Bucket=s3.bucket, Key="cas/.lock")["Body"].read() == b'{"run": "other"}'  # left alone
