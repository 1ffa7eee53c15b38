"""Comparisons: several models probed on one image set, written to a run directory.

A run directory holds ``results.parquet`` (every image's value), ``summary.csv`` (mean and
95% CI per model x layer x head x metric), ``run.json`` (specs, weights, image list
fingerprint, versions, options, timings, failures, non-finite values, and the manifest that
vouches for the other files), ``arrays.npz`` (map metrics) and ``figures/``
(:mod:`probekit.rundir`). Every write is atomic (a temporary file, then a rename).

Each finished part (one model with its options, one image set, one metric with its
options, one dtype) is kept in ``parts/`` (:mod:`probekit.parts`). A second invocation reuses
every finished part without loading the model, and an interrupted run resumes where it
stopped. A model that fails to load or to run is recorded and the others finish.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import models as _models
from .config import CheckedRun, ModelEntry, RunConfig, check_run, load_run
from .errors import ConfigError
from .parts import PartStore, only_metric, part_key, relabel
from .probe import _versions, resolve_dtype
from .results import Results
from .rundir import RunDir, load_run_dir, write_outputs

__all__ = ["compare", "Comparison", "Reporter", "load_run_dir", "part_key"]


class Reporter(Protocol):
    """What a comparison tells its caller while it runs (the CLI draws a progress bar)."""

    def model_started(self, label: str, images: int, cached: bool) -> None: ...

    def images_done(self, label: str, done: int, total: int) -> None: ...

    def model_finished(self, label: str, seconds: float, cached: bool) -> None: ...

    def model_failed(self, label: str, message: str) -> None: ...


class _Quiet:
    def model_started(self, label, images, cached): ...

    def images_done(self, label, done, total): ...

    def model_finished(self, label, seconds, cached): ...

    def model_failed(self, label, message): ...


@dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        results: every model's values (:class:`~probekit.results.Results`).
        figures: paths of the figures written (PNG and SVG).
        run_dir: the run directory.
        failures: one record per model that failed to load or run (also in run.json).
        cached: labels of the models served entirely from finished parts.
        figure_error: why figures could not be drawn (e.g. a full disk), or None.
        nonfinite: where values are NaN or infinite (see :meth:`Results.nonfinite`).
        status: run.json's status: complete, partial (a model failed) or nonfinite.
    """

    results: Results
    figures: list[Path]
    run_dir: Path
    failures: list[dict] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    figure_error: str | None = None
    nonfinite: list[dict] = field(default_factory=list)
    status: str = "complete"

    @property
    def ok(self) -> bool:
        return not self.failures

    def __repr__(self) -> str:
        return (f"Comparison(run_dir={str(self.run_dir)!r}, models={self.results.models}, "
                f"failures={len(self.failures)}, figures={len(self.figures)})")


# -- the run -----------------------------------------------------------------------------------
def _as_config(config_or_path: Any) -> RunConfig:
    if isinstance(config_or_path, RunConfig):
        return config_or_path
    if isinstance(config_or_path, dict):
        from pydantic import ValidationError

        from .config import _format_errors

        try:
            return RunConfig.model_validate(config_or_path)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, None, "run settings")) from None
    return load_run(config_or_path)


def _training(entry: ModelEntry, opts: dict, meta: dict) -> str:
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


def probe_missing(run: CheckedRun, entry: ModelEntry, spec: str, opts: dict, missing: list, rep: Reporter):
    """Load one model and probe the metrics it has no part for; returns (Results, record of timings).

    The one place a comparison computes: an engine other than the local one replaces this.
    An exception carries ``probekit_stage`` (``load`` or ``run``) for the failure record.
    """
    import torch

    from .probe import probe

    cfg = run.config
    t0 = time.perf_counter()
    stage = "load"
    try:
        # random-init controls are the same model on every run; the caller's RNG is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            pm = _models.load(entry.model, label=entry.name, device=cfg.device, **opts)
        t_load = time.perf_counter() - t0
        stage = "run"
        res = probe(
            pm, run.images, [type(m)(**m.options()) for m in missing],
            batch_size=cfg.batch_size, dtype=cfg.dtype, num_workers=cfg.workers, strict=cfg.strict,
            label=entry.name, progress=lambda done, total: rep.images_done(entry.name, done, total),
        )
        info = {"load_s": t_load, "probe_s": time.perf_counter() - t0 - t_load,
                "parameters": pm.adapter.parameters_count(),
                "weights": _weights_id(pm)}
        del pm
        _release_accelerator()
        return res, info
    except Exception as exc:
        exc.probekit_stage = stage
        raise


def _weights_id(pm: Any) -> Any:
    """What names the weights: the alias's weights id, a checkpoint, or the adapter's own record."""
    found = {k: pm.meta[k] for k in ("weights", "pretrained") if k in pm.meta}
    for k, v in pm.adapter.info.items():
        if any(s in k for s in ("weights", "checkpoint", "sha", "hash", "pretrained", "source")) and \
                isinstance(v, (str, int, float, bool)):
            found[k] = v
    return found or None


def _run_record(cfg: RunConfig, run: CheckedRun) -> dict[str, Any]:
    """run.json before any model runs: what was asked for, on which images, with what versions."""
    return {
        "name": cfg.name, "status": "running",
        "config": cfg.model_dump(mode="json"), "source": cfg._source,
        "images": {"count": len(run.images), "fingerprint": run.images.fingerprint(), "names": run.images.names,
                   "paths": None if run.images.paths is None else [str(p) for p in run.images.paths],
                   "skipped": [list(s) for s in run.images.skipped], "labels": run.images.labels, "groups": run.images.groups,
                   "refs": None if run.images.refs is None else [str(r) for r in run.images.refs],
                   "source": run.images.origin},
        "metrics": {m.label: {"name": m.name, "options": m.options(), "unit": m.value_unit()}
                    for m in run.metrics},
        "models": [], "failures": [], "versions": _versions(),
    }


def _failure(record: dict, mrec: dict, spec: str, exc: Exception, rep: Reporter) -> None:
    stage = getattr(exc, "probekit_stage", "run")
    fail = {"model": mrec["label"], "spec": spec, "stage": stage, "error": type(exc).__name__, "message": str(exc)}
    if os.environ.get("PROBEKIT_DEBUG"):
        fail["traceback"] = traceback.format_exc()
    record["failures"].append(fail)
    mrec["failed"] = True
    rep.model_failed(mrec["label"], f"{stage} failed: {type(exc).__name__}: {exc}")


def model_keys(run: CheckedRun, i: int, images: str) -> dict[str, str]:
    """Part keys of model ``i`` per metric label, for the images named by ``images`` (a
    fingerprint; an engine that shards appends the block it covers)."""
    cfg = run.config
    spec, opts, _ = run.specs[i]
    seed = cfg.seed if opts.get("pretrained", True) is False else None  # it draws random-init weights
    dtype = str(resolve_dtype(cfg.dtype))  # bf16 and bfloat16 are one part
    return {m.label: part_key(spec, opts, images, m, dtype, seed) for m in run.metrics}


def _model_parts(run: CheckedRun, i: int, store: PartStore, record: dict, rep: Reporter,
                 engine_info: dict | None = None) -> tuple[list[Results], bool]:
    """One model's parts, read from the cache or computed and cached (none if it failed), and
    whether all of them came from the cache. ``engine_info``: what another engine recorded
    while it computed this model's parts (they are then read from the store, not cached)."""
    cfg, entry = run.config, run.config.models[i]
    spec, opts, alias_meta = run.specs[i]
    label = entry.name
    keys = model_keys(run, i, record["images"]["fingerprint"])
    have = {lbl: r for lbl, k in keys.items() if (r := store.read(k)) is not None}
    missing = [m for m in run.metrics if m.label not in have]
    mrec = {"label": label, "model": entry.model, "spec": spec, "options": opts,
            "training": _training(entry, opts, alias_meta), "alias": alias_meta or None,
            "parts": keys, "cached": [lbl for lbl in keys if lbl in have]}
    if engine_info:
        mrec.update(engine_info)  # computed by another engine this run: not from the cache
    record["models"].append(mrec)
    if engine_info and engine_info.get("failed"):  # the engine recorded the failure
        return [], False
    if not engine_info:  # (another engine reported this model's progress itself)
        rep.model_started(label, len(run.images), cached=not missing)
    t0 = time.perf_counter()
    if missing:
        try:
            res, info = probe_missing(run, entry, spec, opts, missing, rep)
        except Exception as exc:
            _failure(record, mrec, spec, exc, rep)
            return [], False
        mrec.update(info)
        for m in missing:
            have[m.label] = only_metric(res, m.label)
            store.write(keys[m.label], have[m.label])
    out = [_as_this_runs(have[m.label], m.label, mrec, record) for m in run.metrics]  # run-file order
    if not engine_info:
        rep.model_finished(label, time.perf_counter() - t0, cached=not missing)
    return out, not missing and not engine_info


def _other_engine(run: CheckedRun, store: PartStore, record: dict, rep: Reporter) -> dict[str, dict]:
    """Where an engine other than the local one plugs in: it writes the missing parts of every
    model (all models at once) into ``store`` and returns what it recorded per model label."""
    if run.config.engine == "local":
        return {}
    from .engines import get_engine

    return get_engine(run.config.engine)(run, store, record, rep)


def _as_this_runs(part: Results, metric_label: str, mrec: dict, record: dict) -> Results:
    """A part (cached or fresh) under this run's label, noted in the model's and the run's record."""
    part = relabel(part, mrec["label"])
    part.meta["training"] = mrec["training"]
    mrec.setdefault("layout", part.meta.get("layout"))
    mrec.setdefault("geometry", part.meta.get("geometry"))
    # when it was computed (this run or an earlier one) and how long the probe took
    mrec.setdefault("computed", {})[metric_label] = {"seconds": part.meta.get("seconds"), "device": part.meta.get("device")}
    skipped = record["images"]["skipped"]
    for item in (part.meta.get("images") or {}).get("skipped") or []:  # images that failed to decode
        if list(item) not in skipped:
            skipped.append(list(item))
    return part


def _combine(parts: list[Results], record: dict) -> Results:
    """All models' parts as one Results, with the run's provenance as its metadata."""
    res = Results.concat(parts)
    meta = {k: record[k] for k in ("name", "images", "metrics")}
    meta["models"] = res.meta.get("models", {})
    meta["versions"] = next((p.meta.get("versions") for p in parts if p.meta.get("versions")), None)
    res.meta = meta
    return res


def _status(record: dict) -> str:
    if record["failures"]:
        return "partial"
    return "nonfinite" if record["nonfinite"] else "complete"


def compare(config_or_path: Any, out: str | Path | None = None, *, reporter: Reporter | None = None,
            figures: bool = True, **flags: Any) -> Comparison:
    """Probe every model of a run file on its images and write the run directory.

    Args:
        config_or_path: a YAML run file, a :class:`~probekit.config.RunConfig` or a dict.
        out: the run directory (default: the file's ``out``, else ``runs/<name>``).
        reporter: receives progress (see :class:`Reporter`); the CLI passes a progress bar.
        figures: draw the figures the run file asks for (needs seaborn).
        **flags: run settings over the file's (``batch_size``, ``device``, ``dtype``, ...).

    Returns:
        A :class:`Comparison` with ``.results``, ``.figures``, ``.run_dir``, ``.failures``,
        ``.nonfinite`` and ``.status``.

    Raises:
        ConfigError, ImageError, UnknownNameError: before any model is loaded.
        RunDirBusyError: another run is writing the same directory.
        WriteError: the directory is not writable, or the disk is full (finished parts are kept).
        KeyboardInterrupt: after writing what finished; the same call resumes.

    >>> import probekit as pk                                   # doctest: +SKIP
    >>> cmp = pk.compare("configs/quickstart.yaml")             # doctest: +SKIP
    >>> cmp.results.summary().head()                            # doctest: +SKIP
    """
    cfg = _as_config(config_or_path).resolve(out=None if out is None else str(out), **flags)
    run = check_run(cfg)  # everything that can be wrong in the file fails here, before work
    rep = reporter or _Quiet()
    rd = RunDir(Path(cfg.out or Path("runs") / cfg.name))
    with rd.locked():
        record = rd.begin(_run_record(cfg, run))
        t_run = time.perf_counter()
        try:
            collected: list[Results] = []
            cached: list[str] = []
            engine_info = _other_engine(run, rd.parts, record, rep)
            for i, entry in enumerate(cfg.models):
                parts, from_cache = _model_parts(run, i, rd.parts, record, rep, engine_info.get(entry.name))
                collected += parts
                if from_cache:
                    cached.append(entry.name)
            results = _combine(collected, record)
            record["nonfinite"] = results.nonfinite()
            kinds = list(cfg.figures or []) if figures and len(results) else []
            figs = write_outputs(rd, results, record, kinds)
            record["seconds"] = time.perf_counter() - t_run
            rd.finish(record, _status(record))
        except BaseException as exc:
            rd.abandon(record, exc)
            raise
    return Comparison(results, figs, rd.path, record["failures"], cached, record.get("figure_error"),
                      record["nonfinite"], record["status"])
