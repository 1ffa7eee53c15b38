"""run.json: what a run records (specs, images, versions, each model, failures, the engine).

Written by :mod:`probekit.runs.compare` and the engines, read back by the report, ``probekit plot``
and :func:`probekit.runs.rundir.load_run_dir`.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

__all__ = ["record_failure"]


def record_failure(record: dict, mrec: dict, spec: str, exc: Exception, rep: Any) -> None:
    """Record that model ``mrec`` failed (run.json ``failures``) and tell the reporter ``rep``."""
    stage = getattr(exc, "probekit_stage", "run")
    fail = {"model": mrec["label"], "spec": spec, "stage": stage, "error": type(exc).__name__, "message": str(exc)}
    if os.environ.get("PROBEKIT_DEBUG"):
        fail["traceback"] = traceback.format_exc()
    record["failures"].append(fail)
    mrec["failed"] = True
    rep.model_failed(mrec["label"], f"{stage} failed: {type(exc).__name__}: {exc}")
