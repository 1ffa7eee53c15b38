"""The Ray engine: every model of a comparison at once, across a Ray cluster, cached per shard.

Ray Data's batch-inference pattern: per model, a dataset of image references (one row per
chunk, a chunk being one of the local engine's batches), a CPU stage that decodes and applies
the model's own preprocessing (:func:`~probekit.runs.engines.stages.decode_chunk`), and an actor pool
of :class:`~probekit.runs.engines.stages.ProbeReplica` (one replica per GPU when there are GPUs)
that probes each chunk with the local engine. On a run directory that is a folder, on a cluster
whose nodes all run on the driver's machine, the replica writes the chunk's per-image rows itself
into ``parts/`` and returns their files' names, row counts and SHA-256 (and the metric states);
on an ``s3://`` one, or with nodes on other machines, it returns the rows. The models'
datasets stream concurrently; the driver gathers chunks into shards (model x contiguous block
of images), seals each finished shard as a part (its chunks' files checked against their digests
and streamed into it, never all in memory), and, once a model's shards are all in,
writes the same whole-set parts the local engine writes (concatenated rows; dataset-level
metric state merged through ``Metric.merge``) and drops its shard parts. A run killed midway
recomputes only missing shards; a killed replica is restarted and its chunk retried by Ray.
"""

from __future__ import annotations

import pickle
import queue
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from probekit.engine.probe import build_metrics
from probekit.errors import MissingDependencyError, RunDirError
from probekit.inputs.view import join_arrays, metric_arrays
from probekit.metric.state import state_to_json
from probekit.results import Results
from probekit.runs.engines.stages import ProbeReplica, decode_chunk
from probekit.runs.engines.stall import RunStalledError, StallWatch, next_or_stall
from probekit.runs.interrupt import sigterm_as_interrupt
from probekit.runs.parts import PartStore
from probekit.runs.record import EngineInfo, EngineModel, RunRecord, ShardRecord, failed_at, record_failure
from probekit.runs.shards import bounds, cached_shards, read_sealed, seal_whole, shard_keys, shard_size, whole_part

if TYPE_CHECKING:
    from probekit.runs.config import CheckedRun
    from probekit.runs.reporter import Reporter

__all__ = ["run_ray"]

_DONE = object()


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError('The Ray engine needs Ray: pip install "probekit[ray]".') from None
    return ray


@dataclass
class _Job:
    """One model's missing work: its shards, those already cached, and chunks as they arrive."""

    index: int
    label: str
    missing: list  # metrics without a whole-set part
    whole_keys: dict[str, str]
    shard_keys: list[dict[str, str]]
    have: dict[int, dict[str, Results]]  # shard -> metric label -> cached shard part
    todo: list[int]
    chunks: dict[int, dict] = field(default_factory=dict)  # chunk -> payload
    pending: dict[int, list[int]] = field(default_factory=dict)  # shard -> its chunk ids, until written
    timings: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    labels: dict[str, str] | None = None  # image name -> label (labelled sources)


def _plan(run: CheckedRun, store: PartStore, fp: str, shards: list[tuple[int, int]]) -> list[_Job]:
    from probekit.runs.parts import model_keys

    jobs = []
    for i, entry in enumerate(run.config.models):
        whole = model_keys(run, i, fp)
        missing = [m for m in run.metrics if store.read_lazy(whole[m.label]) is None]  # (rows not read)
        if not missing:
            continue
        skeys = shard_keys(run, i, fp, shards)
        have = cached_shards(store, skeys, missing)  # rows stay in the files
        todo = [s for s in range(len(shards)) if s not in have]
        jobs.append(_Job(i, entry.name, missing, whole, skeys, have, todo))
    return jobs


def _chunks(shards: list[tuple[int, int]], todo: list[int], batch: int) -> list[tuple[int, int, int, int]]:
    """(chunk id, shard, lo, hi) for the shards to compute: each chunk one local-engine batch."""
    out = []
    for s in todo:
        lo, hi = shards[s]
        out += [(c, s, a, min(a + batch, hi)) for c, a in ((a // batch, a) for a in range(lo, hi, batch))]
    return out


def _resources(ray, cfg) -> dict[str, Any]:
    """Per-replica and per-task resources: the run file's, else a plan that fits every node.

    The plan is fixed at start, so it must hold for any node that survives the loss of the
    others: Ray restarts a lost replica wherever it fits, and all of them may end up on one node.
    If they then held that node's every CPU, decoding would never get one and the run would wait
    for ever (observed: two 1-CPU nodes, 0.5 CPU per replica and per task, the second node
    stopped mid-run). So each node must fit every replica it could hold plus one decoding task:
    see :func:`_cpu_share`. Values set in the run file are taken as given; the stall bound
    (``stall_s``) turns a plan that starves into a one-line failure that a rerun resumes.
    """
    r = cfg.resources
    cluster = ray.cluster_resources()
    gpus = r.gpus if r.gpus is not None else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
    models = max(1, len(cfg.models))
    replicas = r.replicas or (max(1, int(cluster.get("GPU", 0) // max(gpus, 1e-9) // models)) if gpus else 1)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    share = _cpu_share(nodes or [cluster], models * replicas, gpus)
    shard = shard_size(r, cfg.batch_size, 16 * cfg.batch_size)  # whole batches: chunks never straddle shards
    cpus = r.cpus if r.cpus is not None else share
    return {"gpus": gpus, "cpus": cpus, "decode_cpus": r.decode_cpus or share, "replicas": replicas,
            "shard_size": shard, "stall_s": r.stall_s,
            "cluster": {k: v for k, v in cluster.items() if not k.startswith("node:")}}


def _cpu_share(nodes: list[dict[str, float]], actors: int, gpus: float) -> float:
    """The CPUs each replica and each decoding task asks for (at most 1), so that on every node
    the replicas it can hold and one decoding task fit together.

    A node of ``C`` CPUs can hold ``k`` replicas: all ``actors`` of the run on a CPU-only plan,
    as many as its GPUs allow (``GPU // gpus``) on a GPU plan. With ``C / (k + 1)`` each, ``k``
    replicas leave room for one decoding task on that node, whichever other nodes are lost, and
    the smallest such share over the nodes holds for all of them. A replica needs only a slot,
    not a whole CPU (torch runs on the threads it is given), so small shares cost nothing; nodes
    without CPUs (a head started with ``--num-cpus 0``) take no work and are left out.
    Reserving decoding capacity per node with custom resources would need every node started
    with them; re-planning when the cluster shrinks would restart the pipelines: this needs
    neither.
    """
    share = 1.0
    for node in nodes:
        cpus = node.get("CPU", 0.0)
        if cpus <= 0:
            continue
        hold = actors if not gpus else min(actors, int(node.get("GPU", 0.0) // gpus + 1e-9))
        share = min(share, cpus / (hold + 1))
    return share


def _rows_dir(store: PartStore) -> str | None:
    """The folder replicas write their rows into: a store on a folder, on a cluster whose nodes all
    run on the driver's machine (:func:`_one_machine`); None otherwise, and the rows go through the
    driver (a store that writes its own way, ``s3://``; or nodes on other machines, which may not
    see the driver's folder: probekit cannot tell a shared folder from a local one of the same path)."""
    plain = all(getattr(type(store), f) is getattr(PartStore, f) for f in ("read", "write", "write_files"))
    return str(store.folder.resolve()) if plain and _one_machine() else None


def _one_machine() -> bool:
    """Whether every live node of the connected Ray cluster runs on one machine (one node address);
    True without a cluster (the stages called in this process)."""
    import ray

    if not ray.is_initialized():
        return True
    return len({n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}) <= 1


def _dataset(ray, run, job: _Job, chunks, res: dict, transform, rows_dir: str | None = None):
    cfg, entry = run.config, run.config.models[job.index]
    opts = run.specs[job.index].options
    # each chunk's images as its decoding task needs them: no content digests (half the bytes, held by the
    # driver's object store for the whole run: 33 KB x 196 chunks x 20 models for ImageNet-val, ~130 MB)
    rows = [{"chunk": c, "images": pickle.dumps(run.images.subset(range(lo, hi), digests=False))}
            for c, _, lo, hi in chunks]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map(decode_chunk, fn_kwargs={"transform": transform}, num_cpus=res["decode_cpus"])
    device = "cuda" if res["gpus"] else cfg.device
    return ds.map_batches(
        ProbeReplica, batch_size=1, concurrency=res["replicas"], num_cpus=res["cpus"], num_gpus=res["gpus"],
        fn_constructor_kwargs=dict(model=entry.model, label=entry.name, options=opts, seed=cfg.seed, device=device,
                                   metrics=[(m.name, m.options()) for m in job.missing], dtype=cfg.dtype,
                                   batch_size=cfg.batch_size, rows_dir=rows_dir,
                                   shard_keys=job.shard_keys if rows_dir else None, shard_size=res["shard_size"]),
        max_restarts=-1, max_task_retries=-1,  # a lost replica is restarted and its chunk retried
    )


def _transform(run, i: int):
    """The model's own preprocessing, shipped to the decoding stage (the model is loaded once here)."""
    import torch

    from probekit.models import load

    entry, opts = run.config.models[i], run.specs[i].options
    with torch.random.fork_rng(devices=[]):
        pm = load(entry.model, label=entry.name, device="cpu", **opts)
    return pm.preprocess


def _consume(ds, job: _Job, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for row in ds.iter_rows():
            q.put((job, row))
            if stop.is_set():
                break
        q.put((job, _DONE))
    except BaseException as exc:  # noqa: BLE001  (handed to the driver thread, which raises or records it)
        q.put((job, exc))


def _shard_results(run, job: _Job, lo: int, hi: int, chunk_ids: list[int], folder: Path | None = None
                   ) -> dict[str, Results]:
    """A finished shard's part per metric: its chunks' rows under the real image names (for rows a replica
    wrote into ``folder``, the part has none and lists their files as ``rows_from``)."""
    imgs = run.images
    tables, meta, secs = [], None, 0.0
    arrays: dict[str, list[np.ndarray]] = {}
    states: dict[str, list[dict]] = {}
    seen: list[str] = []  # the decoded images, in order: whole-set metrics' rows come from their merged state
    files: dict[str, list[Path]] = {}  # metric label -> the chunk files a replica wrote its rows into
    for c in chunk_ids:
        p = job.chunks.pop(c)
        secs += p["probe_s"]
        if p.get("empty", p["table"] is None):
            continue
        start = c * run.config.batch_size
        names = [imgs.names[start + int(k)] for k in p["kept"]]
        seen += names
        for label, f in (p.get("files") or {}).items():
            files.setdefault(label, []).append(_checked(folder, f, p["pid"]))
        t = p["table"]
        if t is not None:  # rows handed to the driver (a store that is not a folder)
            t["image"] = [names[int(i)] for i in t["image"].astype(str)]
            if job.labels is not None:
                t["label"] = [job.labels[n] for n in t["image"]]
            tables.append(t)
        for k, v in p["arrays"].items():
            arrays.setdefault(k, []).append(v)
        for k, st in p["states"].items():
            states.setdefault(k, []).append(st)
        meta = meta or p["meta"]
    cols = ["model", "image", "layer", "head", "metric", "value"] + ([] if job.labels is None else ["label"])
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=cols)  # (rows in files, or none)
    out = {}
    for m in job.missing:
        t = table[table["metric"].astype(str) == m.label] if len(table) else table
        arr = metric_arrays({k: join_arrays(k, v) for k, v in arrays.items()}, m.label)  # maps and input views
        mm = dict(meta or {})
        sts = states.get(m.label, [])
        if len(sts) > 1:  # one state per part, the chunks' merged in image order (CKA's is a [D, D] sum per chunk)
            one = build_metrics([(m.name, m.options())])[0]
            for st in sts:
                one.merge(st)
            sts = [one.state_dict()]
        mm.update(seconds=secs, shard=[lo, hi], state=state_to_json(sts))  # JSON, never pickle
        mm["metrics"] = {m.label: (meta or {}).get("metrics", {}).get(m.label, {})}
        if m.whole_set:
            mm["names"] = list(seen)
        out[m.label] = Results(t, arr, mm)
        if files.get(m.label):  # (read by _shard_if_done: the rows are sealed from these files)
            vars(out[m.label])["rows_from"] = files[m.label]
    return out


def _checked(folder: Path | None, f: dict, pid: int) -> Path:
    """A chunk file a replica wrote, checked against the row count and SHA-256 it reported."""
    import pyarrow.parquet as pq

    from probekit._io.fileid import file_digest

    path = (folder or Path(".")) / str(f["file"])
    if folder is None or not path.is_file():
        raise RunDirError(f"The rows a Ray replica (pid {pid}) wrote to {path} are not there: with a cluster of "
                          "several machines the run directory must be a folder every node shares, or an s3:// "
                          "URI; run the same command again to resume from the sealed shards.")
    if file_digest(path) != f["sha256"] or pq.ParquetFile(path).metadata.num_rows != int(f["rows"]):
        raise RunDirError(f"The rows a Ray replica (pid {pid}) wrote to {path} changed after it wrote them (their "
                          "SHA-256 differs); run the same command again to compute that shard anew.")
    return path


def run_ray(run: CheckedRun, store: PartStore, record: RunRecord, rep: Reporter) -> dict[str, EngineModel]:
    """Compute every model's missing parts on Ray; returns what was recorded per model label."""
    ray = _ray()
    cfg = run.config
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    sigterm = ExitStack()  # ray.init's SIGTERM handler exits under a native stack dump: ours stops as Ctrl-C does
    sigterm.enter_context(sigterm_as_interrupt(replace=True))
    res = _resources(ray, cfg)
    n, fp = len(run.images), record.images.fingerprint
    shards = bounds(n, res["shard_size"])
    jobs = _plan(run, store, fp, shards)
    labels = None if run.images.labels is None else dict(zip(run.images.names, run.images.labels, strict=True))
    rows_dir = _rows_dir(store)  # planned once, as the resources are
    for job in jobs:
        job.labels = labels
        if rows_dir is not None:  # chunk rows an interrupted run's replicas left: their shards are redone
            for s in job.todo:
                for key in job.shard_keys[s].values():
                    for f in store.folder.glob(f"{key}.chunk*.rows.parquet"):
                        f.unlink(missing_ok=True)
    record.engine = EngineInfo(name="ray", ray=ray.__version__, address=cfg.address, **res)
    eng = record.engine
    info: dict[str, EngineModel] = {}
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    t_run = time.perf_counter()
    live, consumers = [], []
    before = set(threading.enumerate())  # (Ray Data's executors started later are this run's)
    try:
        for job in jobs:
            mrec = info[job.label] = EngineModel(label=job.label, engine="ray", cached_shards=len(job.have),
                                                 computed_shards=len(job.todo))
            for s in job.have:
                eng.shards.append(ShardRecord(model=job.label, shard=s, images=list(shards[s]), computed=False))
            rep.model_started(job.label, n, cached=not job.todo)
            if not job.todo:  # every shard cached by an interrupted run: assemble them
                _finish(run, job, store, shards, record, rep)
                continue
            try:
                transform = _transform(run, job.index)
            except Exception as exc:
                failed_at(exc, "load")
                record_failure(record, mrec, run.specs[job.index].spec, exc, rep)
                continue
            chunks = _chunks(shards, job.todo, cfg.batch_size)
            job.pending = {s: [c for c, cs, _, _ in chunks if cs == s] for s in job.todo}
            if rows_dir is not None:
                store.folder.mkdir(parents=True, exist_ok=True)
            ds = _dataset(ray, run, job, chunks, res, transform, rows_dir)
            consumers.append(threading.Thread(target=_consume, args=(ds, job, q, stop), daemon=True))
            consumers[-1].start()
            live.append(job)
        running = set(id(j) for j in live)
        watch = StallWatch(res["stall_s"])
        while running:
            job, row = next_or_stall(q, watch, lambda waited: _stalled(waited, watch, jobs, shards, store, res))
            if row is _DONE or isinstance(row, BaseException):
                running.discard(id(job))
                if isinstance(row, BaseException):
                    if isinstance(row, KeyboardInterrupt):
                        raise row
                    failed_at(row, "run")
                    record_failure(record, info[job.label], run.specs[job.index].spec, row, rep)
                else:
                    _finish(run, job, store, shards, record, rep)
                continue
            job.chunks[int(row["chunk"])] = pickle.loads(row["payload"])
            _shard_if_done(run, job, store, shards, eng, rep)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the streams end at their next row, then a cluster started here
        stop.set()
        _wind_down(ray if started else None, consumers)
        raise
    except RunStalledError:  # the streams wait on what may never come: stop their executors; the sealed shards stay
        stop.set()
        _stop_executors(before)
        _wind_down(ray if started else None, consumers)
        raise
    finally:
        stop.set()
        eng.seconds = time.perf_counter() - t_run
        sigterm.close()
    return info


def _stalled(waited: float, watch: StallWatch, jobs: list[_Job], shards: list[tuple[int, int]], store: PartStore,
             res: dict) -> RunStalledError:
    """The one line a run that stopped progressing fails with: what happened, what is kept, how to resume."""
    total = len(jobs) * len(shards)
    sealed = sum(len(j.have) for j in jobs)
    return RunStalledError(
        f"The Ray run made no progress for {waited:.0f} s (bound {watch.bound:.0f} s, resources.stall_s) with "
        f"{sealed} of {total} shards sealed in {store.folder}: a node was lost or the cluster cannot place the "
        f"replicas ({res['cpus']:.3g} CPU, {res['gpus']:.3g} GPU each) and decoding ({res['decode_cpus']:.3g} CPU); "
        "run the same command again to resume from the sealed shards.")


def _stop_executors(before: set[threading.Thread]) -> None:
    """Shut down the Ray Data executors this run started (threads that were not there before it).

    A stream that waits on work that never comes has no row at which to stop, and shutting Ray
    down under it would make its executor start Ray again (Ray's auto-init) to cancel its tasks.
    Shut down, an executor marks its stream finished, so the consumer ends, and it kills its
    tasks and replicas. Ray Data exposes no public handle on the executor of ``iter_rows``: this
    uses its class, and does nothing if that is gone (the streams then end with the process).
    """
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return
    for t in threading.enumerate():
        if isinstance(t, StreamingExecutor) and t not in before:
            try:
                t.shutdown(force=True)
            except Exception:  # noqa: BLE001, S110  (best effort on the way out of a failed run)
                pass


def _wind_down(ray, consumers: list[threading.Thread], seconds: float = 10.0) -> None:
    """After an interrupt: wait (a bounded while: SLURM and Kubernetes kill 30 s after SIGTERM) for
    the streams to stop at their next row, then shut down ``ray`` (a cluster this run started, with
    its actors), so nothing is left running and no stream meets a cluster that is gone."""
    end = time.monotonic() + seconds
    for t in consumers:
        t.join(timeout=max(0.0, end - time.monotonic()))
    if ray is not None:
        ray.shutdown()


def _shard_if_done(run: CheckedRun, job: _Job, store: PartStore, shards: list[tuple[int, int]], eng: EngineInfo,
                   rep: Reporter) -> None:
    for s, ids in list(job.pending.items()):
        if not all(c in job.chunks for c in ids):
            continue
        payloads = [job.chunks[c] for c in ids]
        lo, hi = shards[s]
        parts = _shard_results(run, job, lo, hi, ids, store.folder)  # (where replicas write their rows, if they do)
        for label, part in parts.items():
            rows_from = vars(part).pop("rows_from", None)
            if rows_from:  # a replica wrote the rows: sealed from its files, streamed, then the files go
                store.write_files(job.shard_keys[s][label], rows_from, part)
                for f in rows_from:
                    f.unlink(missing_ok=True)
            else:
                store.write(job.shard_keys[s][label], part)
        if type(store).read is PartStore.read:  # a local store: the rows leave memory, read back from disk
            parts = {label: read_sealed(store, job.shard_keys[s][label]) for label in parts}
        job.have[s] = parts
        del job.pending[s]
        eng.shards.append(ShardRecord(model=job.label, shard=s, images=[lo, hi], computed=True,
                                      probe_s=sum(p["probe_s"] for p in payloads),
                                      decode_s=sum(p["decode_s"] for p in payloads),
                                      pids=sorted({p["pid"] for p in payloads}),
                                      done_s=time.perf_counter() - job.started))
        done = sum(shards[k][1] - shards[k][0] for k in job.have)
        rep.images_done(job.label, done, len(run.images))
        rep.shard_done(job.label, eng.shards[-1])


def _finish(run: CheckedRun, job: _Job, store: PartStore, shards: list[tuple[int, int]], record: RunRecord,
            rep: Reporter) -> None:
    """All shards in: write the whole-set parts, then drop the shard parts they replace."""
    if job.pending:  # the stream ended early (stopped): leave the shards for the next run
        return
    for m in job.missing:
        parts = [job.have[s][m.label] for s in range(len(shards))]
        whole = whole_part(run, job.label, parts, m, record, "ray", [k[m.label] for k in job.shard_keys])
        seal_whole(store, job.whole_keys[m.label], whole)  # rows copied from the shard files, never all in memory
    for keys in job.shard_keys:
        for key in keys.values():
            store.discard(key)
    rep.model_finished(job.label, time.perf_counter() - job.started, cached=False)
