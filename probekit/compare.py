"""Comparisons: several models probed on one image set, written to a run directory.

A run directory holds ``results.parquet`` (every image's value), ``summary.csv`` (mean and
95% CI per model x layer x head x metric), ``run.json`` (specs, weights, image list
fingerprint, versions, options, timings, failures), ``arrays.npz`` (map metrics) and
``figures/``. Every write is atomic (a temporary file, then a rename).

Each finished part (one model with its options, one image set, one metric with its
options, one dtype) is kept as ``parts/<hash>.parquet``. A second invocation reuses every
finished part without loading the model, and an interrupted run resumes where it stopped.
A model that fails to load or to run is recorded and the others finish.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from . import models as _models
from .config import CheckedRun, ModelEntry, RunConfig, check_run, load_run
from .atomic import write_text_atomic
from .errors import ConfigError
from .probe import _versions, resolve_dtype
from .results import Results

__all__ = ["compare", "Comparison", "Reporter", "load_run_dir", "part_key"]

_PART_FORMAT = 1  # bump when the layout of a part file changes: old parts are then ignored


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
        figure_error: why figures could not be drawn (e.g. seaborn missing), or None.
    """

    results: Results
    figures: list[Path]
    run_dir: Path
    failures: list[dict] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    figure_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def __repr__(self) -> str:
        return (f"Comparison(run_dir={str(self.run_dir)!r}, models={self.results.models}, "
                f"failures={len(self.failures)}, figures={len(self.figures)})")


# -- atomic files ------------------------------------------------------------------------------
def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str, sort_keys=False)


# -- part cache --------------------------------------------------------------------------------
def _file_stamps(spec: str, options: dict) -> dict[str, list[int]]:
    """Size and mtime of the local weights files a model is built from (a checkpoint, an ONNX file).

    Why: the same path with new contents (a checkpoint overwritten by more training) must not
    serve the parts computed from the old file.
    """
    files = {}
    if options.get("checkpoint") is not None:
        files["checkpoint"] = Path(str(options["checkpoint"])).expanduser()
    prefix, _, rest = spec.partition(":")
    if prefix == "onnx" and not rest.startswith("pkg:"):
        files["onnx"] = Path(rest).expanduser()
    out = {}
    for what, path in files.items():
        if path.is_file():
            st = path.stat()
            out[what] = [st.st_size, st.st_mtime_ns]
    return out


def part_key(spec: str, options: dict, fingerprint: str, metric: Any, dtype: str, seed: int | None = None) -> str:
    """The cache key of one finished part: model spec and options, image set, metric, dtype.

    The model's label is not part of the key (renaming a model reuses its parts); the probekit
    version is, and so are the run's ``seed`` for a random-init model (it draws the weights) and
    the size and mtime of a local checkpoint or ONNX file.
    """
    from . import __version__
    from .probe import _versions

    ident = {
        "format": _PART_FORMAT,
        "probekit": __version__,  # a new release may compute differently: never reuse across versions
        "libraries": _versions(),  # nor across torch/timm/transformers/... upgrades (defaults, kernels)
        "spec": spec,
        "options": options,
        "images": fingerprint,
        "metric": metric.name,
        "metric_options": metric.options(),
        "dtype": str(dtype),
    }
    if seed is not None:
        ident["seed"] = int(seed)
    stamps = _file_stamps(spec, options)
    if stamps:
        ident["files"] = stamps
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _relabel(res: Results, label: str) -> Results:
    """A cached part under the model name this run uses."""
    old = res.meta.get("model")
    if old == label:
        return res
    table = res.table.astype({"model": str})
    table["model"] = label
    arrays = {f"{label}/{k.rsplit('/', 1)[1]}": v for k, v in res.arrays.items()}
    return Results(table, arrays, {**res.meta, "model": label})


def _read_part(parts: Path, key: str) -> Results | None:
    pq = parts / f"{key}.parquet"
    if not pq.exists():
        return None
    try:
        res = Results.read_parquet(pq)
    except Exception:  # a damaged part is recomputed, never trusted
        return None
    npz = parts / f"{key}.npz"
    if npz.exists():
        try:
            res.arrays = Results.read_arrays(npz)
        except Exception:  # damaged arrays too: recompute the part
            return None
    return res


def _write_part(parts: Path, key: str, res: Results) -> None:
    if res.arrays:
        res.save_arrays(parts / f"{key}.npz")  # arrays first: the parquet marks the part done
    res.to_parquet(parts / f"{key}.parquet")


def _split(res: Results, metric_label: str) -> Results:
    table = res.table[res.table["metric"].astype(str) == metric_label]
    arrays = {k: v for k, v in res.arrays.items() if k.rsplit("/", 1)[1] == metric_label}
    meta = dict(res.meta)
    meta["metrics"] = {metric_label: res.meta.get("metrics", {}).get(metric_label, {})}
    return Results(table, arrays, meta)


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


def _probe_model(run: CheckedRun, entry: ModelEntry, spec: str, opts: dict, missing: list, rep: Reporter):
    """Load one model and probe the missing metrics; returns (Results, record of timings)."""
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
        A :class:`Comparison` with ``.results``, ``.figures``, ``.run_dir`` and ``.failures``.

    Raises:
        ConfigError, ImageError, UnknownNameError: before any model is loaded.
        KeyboardInterrupt: after writing what finished; the same call resumes.

    >>> import probekit as pk                                   # doctest: +SKIP
    >>> cmp = pk.compare("configs/quickstart.yaml")             # doctest: +SKIP
    >>> cmp.results.summary().head()                            # doctest: +SKIP
    """
    cfg = _as_config(config_or_path).resolve(out=None if out is None else str(out), **flags)
    run = check_run(cfg)  # everything that can be wrong in the file fails here, before work
    rep = reporter or _Quiet()
    run_dir = Path(cfg.out or Path("runs") / cfg.name)
    parts = run_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    fp = run.images.fingerprint()
    dtype = str(resolve_dtype(cfg.dtype))  # bf16 and bfloat16 are one part
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_run = time.perf_counter()
    record: dict[str, Any] = {
        "name": cfg.name, "status": "running", "started": started,
        "config": cfg.model_dump(mode="json"), "source": cfg._source,
        "images": {"count": len(run.images), "fingerprint": fp, "names": run.images.names,
                   "paths": None if run.images.paths is None else [str(p) for p in run.images.paths],
                   "skipped": run.images.skipped},
        "metrics": {m.label: {"name": m.name, "options": m.options(), "unit": m.value_unit()}
                    for m in run.metrics},
        "models": [], "failures": [], "versions": _versions(),
    }
    collected: list[Results] = []
    cached_models: list[str] = []

    def _write_record(status: str) -> None:
        record["status"] = status
        record["seconds"] = time.perf_counter() - t_run
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_text_atomic(run_dir / "run.json", _json(record))

    try:
        for entry, (spec, opts, alias_meta) in zip(cfg.models, run.specs):
            label = entry.name
            seed = cfg.seed if opts.get("pretrained", True) is False else None  # it draws random-init weights
            keys = {m.label: part_key(spec, opts, fp, m, dtype, seed) for m in run.metrics}
            have = {lbl: _read_part(parts, k) for lbl, k in keys.items()}
            have = {lbl: r for lbl, r in have.items() if r is not None}
            missing = [m for m in run.metrics if m.label not in have]
            mrec = {"label": label, "model": entry.model, "spec": spec, "options": opts,
                    "training": _training(entry, opts, alias_meta), "alias": alias_meta or None,
                    "parts": keys, "cached": [lbl for lbl in keys if lbl in have]}
            record["models"].append(mrec)
            rep.model_started(label, len(run.images), cached=not missing)
            t0 = time.perf_counter()
            if missing:
                try:
                    res, info = _probe_model(run, entry, spec, opts, missing, rep)
                except Exception as exc:
                    stage = getattr(exc, "probekit_stage", "run")
                    fail = {"model": label, "spec": spec, "stage": stage, "error": type(exc).__name__,
                            "message": str(exc)}
                    if os.environ.get("PROBEKIT_DEBUG"):
                        fail["traceback"] = traceback.format_exc()
                    record["failures"].append(fail)
                    mrec["failed"] = True
                    rep.model_failed(label, f"{stage} failed: {type(exc).__name__}: {exc}")
                    continue
                mrec.update(info)
                for m in missing:
                    have[m.label] = _split(res, m.label)
                    _write_part(parts, keys[m.label], have[m.label])
            else:
                cached_models.append(label)
            for m in run.metrics:  # run-file order, under this run's label
                part = _relabel(have[m.label], label)
                part.meta["training"] = mrec["training"]
                collected.append(part)
                mrec.setdefault("layout", part.meta.get("layout"))
                # when it was computed (this run or an earlier one) and how long the probe took
                mrec.setdefault("computed", {})[m.label] = {"seconds": part.meta.get("seconds"),
                                                            "device": part.meta.get("device")}
            rep.model_finished(label, time.perf_counter() - t0, cached=not missing)
    except KeyboardInterrupt:
        _write_record("interrupted")
        raise

    results = _combine(collected, record)
    results.to_parquet(run_dir / "results.parquet")
    summary = results.summary()
    write_text_atomic(run_dir / "summary.csv", summary.to_csv(index=False, float_format="%.17g"))
    arrays_path = run_dir / "arrays.npz"
    if results.arrays:
        results.save_arrays(arrays_path)
    elif arrays_path.exists():
        arrays_path.unlink()
    figs: list[Path] = []
    if figures and cfg.figures and len(results):
        figs = _draw(results, run_dir, cfg, record)
    record["figures"] = [str(p.relative_to(run_dir)) for p in figs]
    _write_record("complete" if not record["failures"] else "partial")
    return Comparison(results, figs, run_dir, record["failures"], cached_models, record.get("figure_error"))


def _combine(parts: list[Results], record: dict) -> Results:
    res = Results.concat(parts)
    meta = {k: record[k] for k in ("name", "images", "metrics")}
    meta["models"] = {}
    for p in parts:
        m = p.meta
        meta["models"].setdefault(m.get("model"), {
            "spec": m.get("spec"), "adapter": m.get("adapter"), "layout": m.get("layout"),
            "training": m.get("training"), "model_meta": m.get("model_meta"),
            "dtype": m.get("dtype"), "device": m.get("device"),
        })
    meta["versions"] = next((p.meta.get("versions") for p in parts if p.meta.get("versions")), None)
    res.meta = meta
    return res


def _draw(results: Results, run_dir: Path, cfg: RunConfig, record: dict) -> list[Path]:
    from . import plots

    image_paths = dict(zip(record["images"]["names"], record["images"]["paths"] or []))
    try:
        return plots.render_all(results, run_dir / "figures", kinds=cfg.figures, image_paths=image_paths)
    except Exception as exc:  # figures never cost the numbers
        record["figure_error"] = f"{type(exc).__name__}: {exc}"
        return []


def load_run_dir(run_dir: str | Path) -> Results:
    """The results of a run directory (``results.parquet`` with ``arrays.npz`` when present).

    Raises:
        ConfigError: no results in that directory.
    """
    run_dir = Path(run_dir)
    pq = run_dir / "results.parquet"
    if not pq.exists():
        raise ConfigError(f"No results.parquet in {run_dir}. Point at a run directory written by "
                          "`probekit run` or `probekit compare`.")
    res = Results.read_parquet(pq)
    if (run_dir / "arrays.npz").exists():
        res.arrays = Results.read_arrays(run_dir / "arrays.npz")
    return res

