"""Ray replicas write their rows (issue 24 item 1), without a cluster: the stages run in this process
as tests/test_probes.py runs them. A replica given the parts folder writes each chunk's rows itself
and returns only the files' names, row counts and SHA-256; the driver seals each shard from those
files (streamed). The sealed shard parts hold exactly the rows of the path where the driver is
handed the rows and writes them (an s3:// run directory), the payload carries no rows, and a chunk
file changed after its replica wrote it (or missing: a folder the nodes do not share) stops the run
with one line.
"""

from __future__ import annotations

import pickle
import shutil
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import probekit as pk
from probekit.errors import RunDirError
from probekit.runs.parts import PartStore
from probekit.runs.reporter import Reporter


class _Quiet(Reporter):
    pass


@pytest.fixture
def class_tree(tmp_path):
    root = tmp_path / "classes"
    for i, path in enumerate(sorted(pk.sample_images())[:6]):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / f"c{i % 2}" / path.name)
    return root


def _shards(run, pm, store: PartStore, rows_dir: str | None):
    """Both shards of the toy model computed through the stages into ``store``: (job, payloads)."""
    from probekit.runs.engines import ray as engine
    from probekit.runs.engines.stages import ProbeReplica, decode_chunk

    shards = [(0, 4), (4, 6)]
    chunks = engine._chunks(shards, [0, 1], 2)
    keys = [{m.label: f"s{s}-{m.name}" for m in run.metrics} for s in range(len(shards))]
    job = engine._Job(0, "toy", run.metrics, {}, keys, {}, [0, 1],
                      labels=dict(zip(run.images.names, run.images.labels, strict=True)))
    job.pending = {s: [c for c, cs, _, _ in chunks if cs == s] for s in range(len(shards))}
    replica = ProbeReplica(model="toy:vit", label="toy", options={}, seed=run.config.seed, device=None,
                           metrics=[(m.name, m.options()) for m in run.metrics], dtype=run.config.dtype, batch_size=2,
                           rows_dir=rows_dir, shard_keys=keys if rows_dir else None, shard_size=4)
    payloads = {}
    for c, _, lo, hi in reversed(chunks):  # chunks arrive in any order
        row = decode_chunk({"chunk": c, "images": pickle.dumps(run.images.subset(range(lo, hi)))}, pm.preprocess)
        payloads[c] = pickle.loads(replica({k: [v] for k, v in row.items()})["payload"][0])
    return engine, job, shards, payloads


@pytest.mark.usefixtures("toy_backend")
def test_replicas_write_the_rows_the_driver_would_and_the_driver_seals_them(class_tree, run_file, tmp_path):
    from probekit.runs.config import as_config, check_run

    metrics = [{"name": "knn", "options": {"folds": 2, "k": 3}}, "mad"]
    run = check_run(as_config(run_file(models=["toy:vit"], images={"kind": "classes", "path": str(class_tree)},
                                       metrics=metrics, batch_size=2)).resolve())
    torch.manual_seed(run.config.seed)
    pm = pk.load("toy:vit")
    eng, rep = SimpleNamespace(shards=[]), _Quiet()
    stores = {}
    for name, writes in (("driver", False), ("replica", True)):
        store = stores[name] = PartStore(tmp_path / name / "parts")
        store.folder.mkdir(parents=True)
        engine, job, shards, payloads = _shards(run, pm, store, str(store.folder) if writes else None)
        if writes:
            for p in payloads.values():  # no rows travel: file names, row counts, digests
                assert p["table"] is None and set(p["files"]) == {"mad"}  # (knn makes rows from the merged state)
                f = p["files"]["mad"]
                assert pq.ParquetFile(store.folder / f["file"]).metadata.num_rows == f["rows"] > 0
        job.chunks.update(payloads)
        engine._shard_if_done(run, job, store, shards, eng, rep)
        assert not job.pending and not list(store.folder.glob("*.rows.parquet"))  # sealed, chunk files gone
    for s in range(2):
        for m in run.metrics:
            a, b = (stores[n].read(f"s{s}-{m.name}") for n in ("driver", "replica"))
            assert a is not None and b is not None
            if len(a.table) or len(b.table):
                pd.testing.assert_frame_equal(a.table.astype({"image": str}), b.table.astype({"image": str}))
            assert set(a.table.columns) == set(b.table.columns)
            assert a.meta["state"] == b.meta["state"] and a.meta.get("names") == b.meta.get("names")
            if m.name == "knn":  # a shard makes no probe rows, only state
                assert len(a.table) == 0
            else:  # every image of the shard, labelled
                assert set(a.table["image"]) == set(run.images.names[slice(*shards[s])])
                assert list(a.table["label"]) == [job.labels[n] for n in a.table["image"]]

    # a chunk file changed after its replica wrote it, then one that is not there: one line each
    store = PartStore(tmp_path / "bad" / "parts")
    store.folder.mkdir(parents=True)
    engine, job, shards, payloads = _shards(run, pm, store, str(store.folder))
    path = store.folder / payloads[0]["files"]["mad"]["file"]
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    job.chunks.update(payloads)
    with pytest.raises(RunDirError, match=r"changed after it wrote them") as err:
        engine._shard_if_done(run, job, store, shards, eng, rep)
    assert "\n" not in str(err.value)
    path.unlink()
    job.chunks.update(payloads)
    with pytest.raises(RunDirError, match=r"not there: .*a folder every node shares, or an s3:// URI"):
        engine._shard_if_done(run, job, store, shards, eng, rep)


def test_a_chunk_of_an_unlabelled_set_reads_as_unlabelled_whatever_arrow_hands_over():
    """decode_chunk sends ``null`` for an unlabelled chunk; a batch that also holds a string column may
    hand a column of nulls over as NaN (bench_results_scale.py on Ray failed on json.loads('nan'))."""
    import json

    from probekit.runs.engines.stages import _labels

    assert _labels(json.dumps(None)) is None and _labels(float("nan")) is None and _labels(None) is None
    assert _labels(json.dumps(["c0", "1"])) == ["c0", "1"]


def test_replicas_write_rows_only_when_every_node_is_on_the_drivers_machine(tmp_path, monkeypatch):
    """A node on another machine may not see the driver's folder (probekit cannot tell a shared folder
    from a local one of the same path): the rows then go through the driver, as on s3://."""
    import ray

    from probekit.runs.engines.ray import _rows_dir

    store = PartStore(tmp_path / "parts")
    node = {"Alive": True, "NodeManagerAddress": "10.0.0.1"}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [node, {**node, "NodeManagerAddress": "10.0.0.1"}])
    assert _rows_dir(store) == str((tmp_path / "parts").resolve())  # two raylets on one machine
    monkeypatch.setattr(ray, "nodes", lambda: [node, {**node, "NodeManagerAddress": "10.0.0.2"}])
    assert _rows_dir(store) is None
    monkeypatch.setattr(ray, "nodes", lambda: [node, {"Alive": False, "NodeManagerAddress": "10.0.0.2"}])
    assert _rows_dir(store) == str((tmp_path / "parts").resolve())  # a node lost: only the live ones count
