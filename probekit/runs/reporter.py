"""What a run tells its caller while it runs: :class:`Reporter` (the CLI draws a progress bar).

Its own module so that the comparison (:mod:`probekit.runs.compare`) and the engines
(:mod:`probekit.runs.engines`) both name it without importing each other.
"""

from __future__ import annotations

from typing import Protocol

from probekit.runs.record import ShardRecord

__all__ = ["Reporter"]


class Reporter(Protocol):
    """What a comparison tells its caller while it runs (the CLI draws a progress bar).

    Every method is called; a reporter that subclasses this one inherits a no-op for each
    method it does not need.
    """

    def model_started(self, label: str, images: int, cached: bool) -> None:
        """Model ``label`` starts on ``images`` images (``cached``: every part is already there)."""
        return None

    def images_done(self, label: str, done: int, total: int) -> None:
        """``done`` of ``total`` images of ``label`` are probed."""
        return None

    def model_finished(self, label: str, seconds: float, cached: bool) -> None:
        """Model ``label`` is done."""
        return None

    def model_failed(self, label: str, message: str) -> None:
        """Model ``label`` failed to load or run (the others go on)."""
        return None

    def shard_done(self, label: str, shard: ShardRecord) -> None:
        """A shard of ``label`` is computed and cached (engines that shard: Ray); ``shard`` is its
        record in run.json's ``engine``."""
        return None
