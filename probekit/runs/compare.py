"""Comparisons: several models probed on one image set, written to a run directory.

A run directory holds ``results.parquet`` (every image's value), ``summary.csv`` (mean and
95% CI per model x layer x head x metric), ``run.json`` (specs, weights, image list
fingerprint, versions, options, timings, failures, non-finite values, and the manifest that
vouches for the other files), ``arrays.npz`` (map metrics) and ``figures/``
(:mod:`probekit.runs.rundir`). Every write is atomic (a temporary file, then a rename).

Each finished part (one model with its options, one image set, one metric with its
options, one dtype) is kept in ``parts/`` (:mod:`probekit.runs.parts`). A second invocation reuses
every finished part without loading the model, and an interrupted run resumes where it
stopped. A model that fails to load or to run is recorded and the others finish.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from probekit import models as _models
from probekit._installed import library_versions
from probekit.errors import ConfigError
from probekit.results import Results, results_html
from probekit.runs.config import CheckedRun, ModelEntry, RunConfig, as_config, check_run
from probekit.runs.interrupt import sigterm_as_interrupt
from probekit.runs.parts import PartStore, model_keys, only_metric, part_key, relabel
from probekit.runs.record import (
    EngineModel,
    Failure,
    ImagesRecord,
    MetricRecord,
    ModelRecord,
    ReportRecord,
    RunRecord,
    failed_at,
    record_failure,
)
from probekit.runs.reporter import Reporter
from probekit.runs.rundir import RunDir, write_outputs
from probekit.runs.rundirs import load_run_dir, open_run_dir
from probekit.runs.shards import ShardPlan, plan_shards, probe_shards, read_sealed, seal_whole, whole_part

if TYPE_CHECKING:
    from probekit.inputs.images import ImageSet
    from probekit.runs.explorer import ExplorerJob

__all__ = ["run_comparison", "Views", "Comparison", "Reporter", "load_run_dir", "part_key"]


class Views(Protocol):
    """What a comparison draws and writes for people from its results (:class:`probekit.views.outputs.RunViews`).

    ``figures``/``report``: whether to draw the run file's figures, and to write ``contrasts.csv``
    and ``report.html`` (the explorer's arrays are then captured for the showcase images).
    """

    figures: bool
    report: bool

    def render(self, results: Results, out_dir: Path, *, reuse: Path, stamps: Path, kinds: list[str] | None = None,
               metrics: list[str] | None = None) -> list[Path]: ...

    def note_figures(self, record: RunRecord, results: Results, kinds: list[str], explicit: bool) -> None: ...

    def write_report(self, rd: RunDir, results: Results, record: RunRecord, cfg: RunConfig,
                     status: str) -> tuple[Any, Path | None]: ...


#: a comparison of up to this many rows returns its table in memory (read back from results.parquet/ once
#: written); a larger one returns results that read the run directory when used (:meth:`Results.scan`),
#: so a later run into the same directory changes what they read
IN_MEMORY_ROWS = 500_000


class _Quiet(Reporter):
    """A reporter that tells nobody."""


@dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        results: every model's values (:class:`~probekit.results.Results`).
        figures: paths of the figures written (PNG and SVG).
        run_dir: the run directory (its s3:// URI for a run directory in an object store; ``figures``
            and ``report`` are then URIs too).
        failures: one record per model that failed to load or run (also in run.json).
        cached: labels of the models served entirely from finished parts.
        figure_error: why figures could not be drawn (e.g. a full disk), or None.
        nonfinite: where values are NaN or infinite (see :meth:`Results.nonfinite`).
        status: run.json's status: complete, partial (a model failed) or nonfinite; ``failed`` when
            every model failed, and then nothing is kept: a run directory the run created is removed,
            one that was there is left as the run before left it.
        contrasts: group contrasts per metric and layer (:func:`probekit.views.contrasts.contrasts`).
        report: the path of ``report.html``, or None when not written.
        notes: one line per thing the run could not give and why (e.g. a figure kind its
            metrics have no values for); also run.json's ``notes``.
    """

    results: Results
    figures: list[Path]
    run_dir: Path | str
    failures: list[Failure] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    figure_error: str | None = None
    nonfinite: list[dict] = field(default_factory=list)
    status: str = "complete"
    contrasts: Any = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __repr__(self) -> str:
        return (f"Comparison(run_dir={str(self.run_dir)!r}, models={self.results.models}, "
                f"failures={len(self.failures)}, figures={len(self.figures)})")

    def _repr_html_(self) -> str:
        """Where its files are, what failed, then its results' charts (for Jupyter)."""
        return comparison_html(self)

    def plot(self, kind: str = "overlay", metric: str | None = None, *, ax: Any = None, **options: Any) -> Any:
        """One figure of the comparison's results: :meth:`probekit.results.Results.plot`."""
        return self.results.plot(kind, metric, ax=ax, **options)


# -- the run -----------------------------------------------------------------------------------
def _training(entry: ModelEntry, opts: dict[str, Any], meta: dict[str, Any]) -> str:
    if entry.training:
        return entry.training
    if opts.get("pretrained", True) is False:
        return "random init"
    return str(meta.get("training", "unknown"))


def _release_accelerator() -> None:
    """Give a finished model's accelerator memory back before the next model loads."""
    import torch

    if torch.cuda.is_available():
        gc.collect()  # cycles in a model keep its CUDA tensors alive; slow, so only where it matters
        torch.cuda.empty_cache()


def probe_missing(run: CheckedRun, entry: ModelEntry, mrec: ModelRecord, missing: list, rep: Reporter,
                  explore: ExplorerJob | None = None, shards: ShardPlan | None = None,
                  store: PartStore | None = None) -> Results | None:
    """Load one model and probe the metrics it has no part for; returns their Results (None when
    none is missing, or when ``shards`` are given: each shard's parts are then sealed in ``store`` as
    soon as it is probed, :func:`probekit.runs.shards.probe_shards`), and records in ``mrec`` what
    loading and probing took.

    ``explore``, when given, records the report's explorer arrays in the probing pass (an observer of
    the same forward passes), or captures them with a pass of their own when no metric is missing.

    The one place a comparison computes: an engine other than the local one replaces this.
    An exception carries ``probekit_stage`` (``load`` or ``run``) for the failure record.
    """
    import torch

    from probekit.engine.probe import probe

    cfg = run.config
    t0 = time.perf_counter()
    stage = "load"
    try:
        # random-init controls are the same model on every run; the caller's RNG is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            pm = _models.load(entry.model, label=entry.name, device=cfg.device, **mrec.options)
        t_load = time.perf_counter() - t0
        mrec.parameters, mrec.weights = pm.adapter.parameters_count(), _weights_id(pm)
        stage = "run"
        probing = bool(missing) and (shards is None or bool(shards.todo))
        recorder = explore.recorder(pm, run.images) if explore is not None and probing else None
        options: dict[str, Any] = dict(batch_size=cfg.batch_size, dtype=cfg.dtype, num_workers=cfg.workers,
                                       strict=cfg.strict)
        res = None
        if shards is not None and probing:  # a set larger than a shard: each shard sealed as it is done
            assert store is not None  # noqa: S101  (given with shards)
            probe_shards(pm, run, entry.name, missing, shards, store,
                         dict(parameters=mrec.parameters, weights=mrec.weights, load_s=t_load),
                         progress=lambda done, total: rep.images_done(entry.name, done, total), observer=recorder,
                         **options)
        elif missing and shards is None:
            res = probe(pm, run.images, [type(m)(**m.options()) for m in missing], label=entry.name,
                        progress=lambda done, total: rep.images_done(entry.name, done, total), observer=recorder,
                        **options)
        recorded_s = recorder.seconds if recorder is not None else 0.0  # the explorer's share of the pass
        probe_s = time.perf_counter() - t0 - t_load - recorded_s
        explorer_s = None
        if explore is not None:
            t1 = time.perf_counter()
            explore.finish(pm, recorder)
            explorer_s = time.perf_counter() - t1 + recorded_s
        mrec.load_s, mrec.probe_s, mrec.explorer_s = t_load, probe_s, explorer_s
        del pm
        _release_accelerator()
        return res
    except Exception as exc:
        failed_at(exc, stage)
        raise


def _weights_id(pm: Any) -> Any:
    """What names the weights: the alias's weights id, a checkpoint, or the adapter's own record."""
    found = {k: pm.meta[k] for k in ("weights", "pretrained") if k in pm.meta}
    for k, v in pm.adapter.info.items():
        if any(s in k for s in ("weights", "checkpoint", "sha", "hash", "pretrained", "source")) and \
                isinstance(v, (str, int, float, bool)):
            found[k] = v
    return found or None


def _run_record(cfg: RunConfig, run: CheckedRun) -> RunRecord:
    """run.json before any model runs: what was asked for, on which images, with what versions."""
    images = run.images
    return RunRecord(
        name=cfg.name, status="running", config=cfg.model_dump(mode="json"), source=cfg._source,
        images=ImagesRecord(
            count=len(images), fingerprint=images.fingerprint(), names=images.names,
            paths=None if images.paths is None else [str(p) for p in images.paths],
            skipped=[list(s) for s in images.skipped], notes=[list(n) for n in images.notes],
            labels=images.labels, groups=images.groups,
            refs=None if images.refs is None else [str(r) for r in images.refs], source=images.origin),
        metrics={m.label: MetricRecord(name=m.name, options=m.options(), unit=m.unit) for m in run.metrics},
        models=[], failures=[], versions=library_versions(),
    )


def _model_parts(run: CheckedRun, i: int, store: PartStore, record: RunRecord, rep: Reporter,
                 engine_info: EngineModel | None = None,
                 showcase: ImageSet | None = None) -> tuple[list[Results], bool]:
    """One model's parts, read from the cache or computed and cached (none if it failed), and
    whether all of them came from the cache. ``engine_info``: what another engine recorded
    while it computed this model's parts (they are then read from the store, not cached). With
    ``showcase`` images, the report explorer's arrays are captured too when they are not cached
    (the model is loaded here for them alone if need be)."""
    cfg, entry = run.config, run.config.models[i]
    spec, opts, alias_meta = run.specs[i]
    label = entry.name
    keys = model_keys(run, i, record.images.fingerprint)
    have = {lbl: r for lbl, k in keys.items() if (r := store.read_lazy(k)) is not None}  # rows stay on disk
    missing = [m for m in run.metrics if m.label not in have]
    mrec = ModelRecord(label=label, model=entry.model, spec=spec, options=opts,
                       training=_training(entry, opts, alias_meta), alias=alias_meta or None,
                       parts=keys, cached=[lbl for lbl in keys if lbl in have], tags=dict(entry.tags))
    if engine_info:  # computed by another engine this run: not from the cache
        mrec.engine, mrec.failed = engine_info.engine, engine_info.failed
        mrec.cached_shards, mrec.computed_shards = engine_info.cached_shards, engine_info.computed_shards
    record.models.append(mrec)
    if engine_info and engine_info.failed:  # the engine recorded the failure
        return [], False
    explore = _explorer_job(store.folder, keys, showcase, cfg, mrec, record)
    if not engine_info:  # (another engine reported this model's progress itself)
        rep.model_started(label, len(run.images), cached=not missing)
    t0 = time.perf_counter()
    # a set larger than a shard is probed shard by shard (engine_info: another engine computed the model)
    shards = plan_shards(run, i, store, record.images.fingerprint, missing) if missing and not engine_info else None
    if explore is not None or (missing and (shards is None or shards.todo)):  # the model is needed
        try:
            res = probe_missing(run, entry, mrec, missing, rep, explore, shards, store)
        except Exception as exc:
            record_failure(record, mrec, spec, exc, rep)
            return [], False
        for m in missing if shards is None else ():
            assert res is not None  # (probed: a metric was missing)
            have[m.label] = only_metric(res, m.label)
            # what loading the model told, kept with the part: a cached rerun still shows it
            have[m.label].meta.update(parameters=mrec.parameters, weights=mrec.weights, load_s=mrec.load_s)
            store.write(keys[m.label], have[m.label])
    if shards is not None:  # every shard sealed: the whole-set parts, their rows streamed from the shards' files
        for m in missing:
            parts = [shards.have[s][m.label] for s in range(len(shards.bounds))]
            seal_whole(store, keys[m.label], whole_part(run, label, parts, m, record, "local",
                                                        [k[m.label] for k in shards.keys]))
            have[m.label] = read_sealed(store, keys[m.label])
        for k in shards.keys:
            for key in k.values():
                store.discard(key)
    out = [_as_this_runs(have[m.label], m.label, mrec, record) for m in run.metrics]  # run-file order
    if not engine_info:
        rep.model_finished(label, time.perf_counter() - t0, cached=not missing)
    return out, not missing and not engine_info


def _other_engine(run: CheckedRun, store: PartStore, record: RunRecord, rep: Reporter) -> dict[str, EngineModel]:
    """Where an engine other than the local one plugs in: it writes the missing parts of every
    model (all models at once) into ``store`` and returns what it recorded per model label."""
    if run.config.engine == "local":
        return {}
    from probekit.runs.engines import get_engine

    found: dict[str, EngineModel] = get_engine(run.config.engine)(run, store, record, rep)
    return found


def _as_this_runs(part: Results, metric_label: str, mrec: ModelRecord, record: RunRecord) -> Results:
    """A part (cached or fresh) under this run's label, noted in the model's and the run's record."""
    part = relabel(part, mrec.label)
    part.meta["training"] = mrec.training
    if mrec.computed is None:  # the first part of this model: its layout and geometry
        mrec.layout, mrec.geometry, mrec.computed = part.meta.get("layout"), part.meta.get("geometry"), {}
    # when it was computed (this run or an earlier one) and how long the probe took
    mrec.computed[metric_label] = {"seconds": part.meta.get("seconds"), "device": part.meta.get("device")}
    if part.meta.get("load_s") is not None:  # (parts written before this was kept have none)
        mrec.computed[metric_label]["load_s"] = part.meta["load_s"]
    for key in ("parameters", "weights"):  # the model's, whichever run loaded it
        if getattr(mrec, key) is None and part.meta.get(key) is not None:
            setattr(mrec, key, part.meta[key])
    skipped = record.images.skipped
    for item in (part.meta.get("images") or {}).get("skipped") or []:  # images that failed to decode
        if list(item) not in skipped:
            skipped.append(list(item))
    return part


def _combine(parts: list[Results], record: RunRecord) -> Results:
    """All models' parts as one Results, with the run's provenance as its metadata."""
    res = Results.concat(parts)
    meta: dict[str, Any] = record.model_dump(include={"name", "images", "metrics"})
    meta["models"] = res.meta.get("models", {})
    meta["versions"] = next((p.meta.get("versions") for p in parts if p.meta.get("versions")), None)
    res.meta = meta
    return res


def _status(record: RunRecord) -> str:
    if record.failures:
        return "partial"
    return "nonfinite" if record.nonfinite else "complete"


def run_comparison(config_or_path: Any, out: str | Path | None = None, *, reporter: Reporter | None = None,
                   views: Views | None = None, **flags: Any) -> Comparison:
    """Probe every model of a run file on its images and write the run directory
    (``pk.compare``, :func:`probekit.api.compare`, passes the figures and the report as ``views``).

    Args:
        config_or_path: a YAML run file, a :class:`~probekit.runs.config.RunConfig` or a dict.
        out: the run directory (default: the file's ``out``, else ``runs/<name>``).
        reporter: receives progress (see :class:`Reporter`); the CLI passes a progress bar.
        views: what is drawn and written for people from the results (figures, ``contrasts.csv``,
            ``report.html`` and the explorer's arrays, see :class:`Views`); None: the numbers only.
        **flags: run settings over the file's (``batch_size``, ``device``, ``dtype``, ...).

    Returns and raises as :func:`probekit.api.compare` says (``pk.compare``, this with its views).
    """
    given = as_config(config_or_path)
    explicit_figures = "figures" in given.model_fields_set  # the file's own list, not the default
    cfg = given.resolve(out=None if out is None else str(out), **flags)
    run = check_run(cfg)  # everything that can be wrong in the file fails here, before work
    rep = reporter or _Quiet()
    rd = open_run_dir(cfg.out or Path("runs") / cfg.name)  # a path, or an s3:// URI
    showcase = _showcase(cfg, run) if views is not None and views.report else None
    with sigterm_as_interrupt(), rd.locked():  # SIGTERM (SLURM, Kubernetes) stops it as Ctrl-C does
        record = rd.begin(_run_record(cfg, run))
        if showcase is not None:
            record.report = ReportRecord(showcase=showcase.names, explorer_mb=cfg.report.explorer_mb,
                                         group_by=cfg.report.group_by)
        t_run = time.perf_counter()
        try:
            collected: list[Results] = []
            cached: list[str] = []
            engine_info = _other_engine(run, rd.parts, record, rep)
            for i, entry in enumerate(cfg.models):
                parts, from_cache = _model_parts(run, i, rd.parts, record, rep, engine_info.get(entry.name), showcase)
                collected += [rd.keep_rows(p) for p in parts]  # rows go to results.parquet/ now, not memory
                if from_cache:
                    cached.append(entry.name)
            if record.models and all(m.failed for m in record.models):  # nothing to show: no run directory
                rd.undo()
                record.status = "failed"
                return Comparison(_combine([], record), [], rd.where, list(record.failures), status="failed")
            results = rd.results_of(_combine(collected, record))  # rows read from the folder when used
            record.nonfinite = results.nonfinite()
            anything = len(results) > 0 or bool(results.arrays)  # map metrics alone have no table rows
            draw = views is not None and views.figures and anything
            kinds: list[str] = list(cfg.figures or []) if draw else []
            t0 = time.perf_counter()
            figs = write_outputs(rd, results, record, kinds, None if views is None else views.render)
            if views is not None:
                views.note_figures(record, results, kinds, explicit_figures)
            record.timing("outputs_s", time.perf_counter() - t0)  # figures must not dominate a run
            record.seconds = time.perf_counter() - t_run
            contrast_table, html = views.write_report(rd, results, record, cfg, _status(record)) \
                if views is not None and views.report and anything else (None, None)
            record.seconds = time.perf_counter() - t_run
            rd.finish(record, _status(record))
            if len(results) <= IN_MEMORY_ROWS:  # a small run's results stay as they were, whatever runs next
                results.table  # noqa: B018  (read now, under the lock)
        except BaseException as exc:
            rd.abandon(record, exc)
            raise
    return Comparison(results, [rd.public(p) for p in figs], rd.where, list(record.failures), cached,
                      record.figure_error, record.nonfinite or [], record.status, contrast_table,
                      None if html is None else rd.public(html), list(record.notes or []))


# -- report: explorer arrays, contrasts, report.html (each failure is recorded, never costs the numbers)
def _showcase(cfg: RunConfig, run: CheckedRun) -> ImageSet | None:
    """The showcase subset of the run's images: those named, or ``showcase`` of them; of a labelled
    set, the first image of each label in turn (labels in order of first appearance), so the
    explorer shows different classes, not the first class only."""
    want = cfg.report.showcase
    names = run.images.names
    if isinstance(want, int):
        idx = spread_over_labels(run.images.labels, min(want, len(names)))
    else:
        unknown = [n for n in want if n not in names]
        if unknown:
            raise ConfigError(f"report.showcase names image(s) not in the run: {', '.join(unknown)}. "
                              f"Use names from the image set, e.g. {', '.join(names[:3])}.")
        idx = [names.index(n) for n in want]
    return run.images.subset(idx) if idx else None


def spread_over_labels(labels: list[Any] | None, count: int) -> list[int]:
    """``count`` image indices: the first ``count`` without labels; with labels, round-robin over the
    labels in order of first appearance (each label's images in set order), returned sorted.

    >>> spread_over_labels(["cat", "cat", "cat", "dog", "dog", "owl"], 4)
    [0, 1, 3, 5]
    >>> spread_over_labels(None, 2)
    [0, 1]
    """
    if not labels:
        return list(range(count))
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(str(lab), []).append(i)
    queues, picked = list(by_label.values()), list[int]()
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop(0))
    return sorted(picked)


def _explorer_job(parts: Path, keys: dict[str, str], showcase: ImageSet | None, cfg: RunConfig, mrec: ModelRecord,
                  record: RunRecord) -> ExplorerJob | None:
    """What records this model's explorer arrays, or None when cached (or not wanted)."""
    if showcase is None:
        return None
    from probekit.runs import explorer

    budget = int(cfg.report.explorer_mb * 2**20)
    path = parts / "explorer" / f"{explorer.explorer_key(keys, showcase.names, budget)}.npz"
    mrec.explorer = str(path.relative_to(parts.parent))
    if path.exists() and explorer.load(path) is not None:
        return None
    return explorer.ExplorerJob(path, showcase, budget, mrec, record)  # a failure is a note, never the numbers


def comparison_html(cmp: Comparison) -> str:
    """A comparison: where its files are, what failed, then its results' tables."""
    items = [f"run directory <code>{escape(str(cmp.run_dir))}</code>"]
    if cmp.report is not None:
        items.append(f"report <code>{escape(str(cmp.report))}</code>")
    if cmp.cached:
        items.append(f"served from cache: {escape(', '.join(cmp.cached))}")
    fails = "".join(f"<li style='color:#b3261e'>{escape(f.model)} ({escape(f.stage)}): {escape(f.error)}: "
                    f"{escape(f.message)}</li>" for f in cmp.failures)
    return (f"<div class='probekit-comparison'><p><b>Comparison</b>: {'; '.join(items)}</p>"
            f"{'<ul>' + fails + '</ul>' if fails else ''}{results_html(cmp.results)}</div>")
