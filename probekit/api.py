"""``pk.compare``: a comparison with its views (figures, contrasts, the HTML report).

The run (:func:`probekit.runs.compare.run_comparison`) computes and keeps the numbers; the views
(:class:`probekit.views.outputs.RunViews`) are drawn from them. This is the one place that joins
the two layers, so neither imports the other the wrong way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from probekit.runs.compare import Comparison, Reporter, run_comparison
from probekit.views.outputs import RunViews

__all__ = ["compare"]


def compare(config_or_path: Any, out: str | Path | None = None, *, reporter: Reporter | None = None,
            figures: bool = True, report: bool = True, **flags: Any) -> Comparison:
    """Probe every model of a run file on its images and write the run directory.

    Args:
        config_or_path: a YAML run file, a :class:`~probekit.runs.config.RunConfig` or a dict.
        out: the run directory (default: the file's ``out``, else ``runs/<name>``); a path, or an
            ``s3://bucket/prefix`` (:mod:`probekit.runs.remote`; the returned ``run_dir``, ``figures``
            and ``report`` are then its addresses in the store).
        reporter: receives progress (see :class:`~probekit.runs.compare.Reporter`); the CLI passes a
            progress bar.
        figures: draw the figures the run file asks for (needs seaborn).
        report: write ``contrasts.csv`` and the self-contained ``report.html`` (with the
            attention explorer's arrays for the run file's showcase images).
        **flags: run settings over the file's (``batch_size``, ``device``, ``dtype``, ...).

    Returns:
        A :class:`~probekit.runs.compare.Comparison` with ``.results``, ``.figures``, ``.run_dir``,
        ``.failures``, ``.nonfinite`` and ``.status``.

    Raises:
        ConfigError, ImageError, UnknownNameError: before any model is loaded.
        RunDirBusyError: another run is writing the same directory.
        WriteError: the directory is not writable, or the disk is full (finished parts are kept).
        KeyboardInterrupt: after writing what finished; the same call resumes. SIGTERM raises
            :class:`~probekit.runs.interrupt.Terminated` (a KeyboardInterrupt) the same way.

    >>> import probekit as pk                                   # doctest: +SKIP
    >>> cmp = pk.compare("configs/quickstart.yaml")             # doctest: +SKIP
    >>> cmp.results.summary().head()                            # doctest: +SKIP
    """
    return run_comparison(config_or_path, out, reporter=reporter, views=RunViews(figures=figures, report=report),
                          **flags)
