"""Engines beside the local one (probekit.engine.probe, the reference): each computes a comparison's
missing parts and writes them into the run directory's part store, so the run directory is
the same whichever engine filled it (see probekit.runs.compare._other_engine).
"""

from __future__ import annotations

from collections.abc import Callable

from probekit.errors import ConfigError

__all__ = ["get_engine", "ENGINES"]

ENGINES = ("local", "ray")


def get_engine(name: str) -> Callable:
    """The engine's entry point ``(run, store, record, reporter) -> {model label: record}``."""
    if name == "ray":
        from probekit.runs.engines.ray import run_ray

        return run_ray
    raise ConfigError(f"Unknown engine {name!r}; use one of {', '.join(ENGINES)}.")
