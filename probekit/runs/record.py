"""run.json: what a run records (specs, images, versions, each model, failures, the engine).

Written by :mod:`probekit.runs.compare` and the engines, read back by the report, ``probekit plot``
and :func:`probekit.runs.rundir.load_run_dir`. The record is typed (:class:`RunRecord`) and written
as the JSON it always was: the same keys, and a key that a run leaves unset (``manifest`` while a
run is unfinished, ``report_error`` when the report was written...) is absent rather than null.
Reading validates: keys of other probekit versions are ignored, a value of the wrong type refuses
the file (:func:`probekit.runs.rundir.read_record`).
"""

from __future__ import annotations

import os
import traceback
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = ["RunRecord", "ImagesRecord", "ModelRecord", "Failure", "EngineInfo", "EngineModel", "ShardRecord",
           "ReportRecord", "MetricRecord", "record_failure", "failed_at"]


class _Record(BaseModel):
    """A part of run.json: unknown keys (another version's) are ignored on reading; assignments
    are validated; the fields named in ``_absent_when_none`` are left out while they are None."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)
    _absent_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        absent = self._absent()
        return {k: v for k, v in data.items() if not (v is None and k in absent)}

    def _absent(self) -> frozenset[str]:
        """The fields left out of the JSON while they are None."""
        return self._absent_when_none


class ImagesRecord(_Record):
    """The image set: its fingerprint (part of every cache key), names, and where they came from."""

    count: int
    fingerprint: str
    names: list[str]
    paths: list[str] | None = None
    skipped: list[list[str]] = Field(default_factory=list)  # [name, reason]: could not be decoded
    notes: list[list[str]] = Field(default_factory=list)  # [name, note]: e.g. multi-frame images
    labels: list[Any] | None = None
    groups: list[Any] | None = None
    refs: list[str] | None = None
    source: dict[str, Any] | None = None  # the source and sampling that listed the set


class MetricRecord(_Record):
    """One metric of the run, under its label: its registered name, options and unit."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    unit: str | None = None


class Failure(_Record):
    """A model that failed to load or run (the others finish)."""

    _absent_when_none = frozenset({"traceback"})

    model: str  # its label
    spec: str
    stage: str  # load or run
    error: str  # the exception's type
    message: str
    traceback: str | None = None  # with PROBEKIT_DEBUG set


class ModelRecord(_Record):
    """One model of the run: what was asked for, its parts, and what loading and probing it took."""

    _absent_when_none = frozenset({
        "engine", "cached_shards", "computed_shards", "failed", "load_s", "probe_s", "parameters", "weights",
        "explorer_s", "layout", "geometry", "computed", "explorer"})

    label: str
    model: str
    spec: str
    options: dict[str, Any] = Field(default_factory=dict)
    training: str | None = None
    alias: dict[str, Any] | None = None  # the alias's metadata (configs/models.yaml)
    parts: dict[str, str] = Field(default_factory=dict)  # metric label -> part key
    cached: list[str] = Field(default_factory=list)  # metric labels served from finished parts
    tags: dict[str, str] = Field(default_factory=dict)
    # computed by an engine other than the local one (:class:`EngineModel`)
    engine: str | None = None
    cached_shards: int | None = None
    computed_shards: int | None = None
    failed: bool | None = None  # True when it failed (see the run's ``failures``)
    # when it was loaded in this run
    load_s: float | None = None
    probe_s: float | None = None
    parameters: int | None = None
    weights: Any = None  # what names the weights (an alias's weights id, a checkpoint, a hash)
    explorer_s: float | None = None
    # from its parts (this run's or an earlier one's)
    layout: dict[str, Any] | None = None
    geometry: Any = None
    computed: dict[str, dict[str, Any]] | None = None  # metric label -> {seconds, device}
    explorer: str | None = None  # the explorer's arrays, relative to the run directory

    def _absent(self) -> frozenset[str]:
        # once a part is noted (``computed``), its layout and geometry are written, null or not
        return self._absent_when_none - ({"layout", "geometry"} if self.computed is not None else set())


class EngineModel(_Record):
    """What an engine other than the local one records of one model (copied into its :class:`ModelRecord`)."""

    label: str
    engine: str
    cached_shards: int
    computed_shards: int
    failed: bool | None = None


class ShardRecord(_Record):
    """One shard (model x block of images) of the Ray engine: cached, or computed and where."""

    _absent_when_none = frozenset({"probe_s", "decode_s", "pids", "done_s"})

    model: str
    shard: int
    images: list[int]  # [lo, hi)
    computed: bool
    probe_s: float | None = None
    decode_s: float | None = None
    pids: list[int] | None = None  # the replicas' processes
    done_s: float | None = None  # since the model started


class EngineInfo(_Record):
    """The engine that computed the run's missing parts, when it is not the local one."""

    name: str
    ray: str | None = None  # its version
    address: str | None = None
    gpus: float | None = None
    cpus: float | None = None
    decode_cpus: float | None = None
    replicas: int | None = None
    shard_size: int | None = None
    stall_s: float | None = None  # the run file's bound on a wait without progress (None: the default)
    cluster: dict[str, float] = Field(default_factory=dict)
    shards: list[ShardRecord] = Field(default_factory=list)
    seconds: float | None = None


class ReportRecord(_Record):
    """What the report's explorer shows (run file ``report:``)."""

    showcase: list[str] = Field(default_factory=list)  # image names
    explorer_mb: float | None = None
    group_by: str = "training"


class RunRecord(_Record):
    """run.json: one run of a run directory, from ``running`` to its final status.

    ``run_id``, ``status``, ``started`` and ``owned`` are set by :meth:`RunDir.begin`;
    ``finished`` and, for a finished run, ``manifest`` by :meth:`RunDir.finish`.
    """

    _absent_when_none = frozenset({
        "run_id", "started", "finished", "owned", "manifest", "figures", "nonfinite", "report", "report_error",
        "figure_error", "error", "timings", "seconds", "engine", "notes", "report_notes"})

    name: str | None = None
    status: str
    run_id: str | None = None
    started: str | None = None
    finished: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the run settings, resolved
    source: Any = None  # the run file
    images: ImagesRecord
    metrics: dict[str, MetricRecord] = Field(default_factory=dict)  # by label
    models: list[ModelRecord] = Field(default_factory=list)
    failures: list[Failure] = Field(default_factory=list)
    versions: dict[str, Any] = Field(default_factory=dict)
    #: every file a probekit run wrote here (None: a record of a version that did not say)
    owned: list[str] | None = None
    manifest: dict[str, str] | None = None  # file -> SHA-256: what a finished run vouches for
    figures: list[str] | None = None
    nonfinite: list[dict[str, Any]] | None = None  # see :meth:`Results.nonfinite`
    report: ReportRecord | None = None
    report_error: str | None = None
    figure_error: str | None = None
    error: str | None = None  # why the run stopped (failed or interrupted)
    notes: list[str] | None = None  # what the run could not give, and why
    report_notes: list[str] | None = None
    timings: dict[str, float] | None = None  # seconds spent after probing
    seconds: float | None = None
    engine: EngineInfo | None = None

    def model(self, label: str) -> ModelRecord | None:
        """The record of the model labelled ``label``, or None."""
        return next((m for m in self.models if m.label == label), None)

    def add_notes(self, notes: list[str], report: bool = False) -> None:
        """Add lines to ``notes`` (or ``report_notes``), creating it."""
        if report:
            self.report_notes = [*(self.report_notes or []), *notes]
        else:
            self.notes = [*(self.notes or []), *notes]

    def timing(self, name: str, seconds: float) -> None:
        """Record what a step after probing took (``timings``)."""
        self.timings = {**(self.timings or {}), name: seconds}


def failed_at(exc: BaseException, stage: str) -> None:
    """Mark ``exc`` as raised while a model was at ``stage`` (``load`` or ``run``: see :func:`record_failure`)."""
    setattr(exc, "probekit_stage", stage)  # noqa: B010  (an attribute exceptions do not declare)


class _Told(Protocol):
    """Who hears of a failure (a :class:`probekit.runs.reporter.Reporter`)."""

    def model_failed(self, label: str, message: str) -> None: ...


def record_failure(record: RunRecord, model: ModelRecord | EngineModel, spec: str, exc: BaseException,
                   rep: _Told) -> None:
    """Record that ``model`` failed (run.json ``failures``, and its ``failed``) and tell the reporter ``rep``."""
    stage = getattr(exc, "probekit_stage", "run")
    record.failures.append(Failure(
        model=model.label, spec=spec, stage=stage, error=type(exc).__name__, message=str(exc),
        traceback=traceback.format_exc() if os.environ.get("PROBEKIT_DEBUG") else None))
    model.failed = True
    rep.model_failed(model.label, f"{stage} failed: {type(exc).__name__}: {exc}")
