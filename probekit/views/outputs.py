"""What a run draws and writes for people from its results: figures, ``contrasts.csv`` and
``report.html`` (:class:`RunViews`, what ``pk.compare`` hands the run), and figures of a finished
run directory (:func:`redraw`, ``probekit plot``).

Why here: the run (:mod:`probekit.runs`) computes and keeps the numbers; views are drawn from
them and never the other way round, so a failing figure or report costs no number.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from probekit._io.atomic import write_text_atomic
from probekit._io.fileid import file_digest
from probekit.errors import ConfigError, WriteError
from probekit.inputs.view import is_view
from probekit.results import Results
from probekit.runs.record import RunRecord
from probekit.runs.rundir import RunDir, now
from probekit.runs.rundirs import load_run_dir, open_run_dir, read_record
from probekit.views.contrasts import contrasts
from probekit.views.plots import figure_notes, render_all
from probekit.views.report import record_groups, write_report

__all__ = ["RunViews", "redraw"]


class RunViews:
    """The views of a comparison (:class:`probekit.runs.compare.Views`): the figures the run file
    asks for (``figures``) and the report with its contrasts and explorer (``report``)."""

    render = staticmethod(render_all)

    def __init__(self, figures: bool = True, report: bool = True):
        self.figures = figures
        self.report = report

    def note_figures(self, record: RunRecord, results: Results, kinds: list[str], explicit: bool) -> None:
        """Say in run.json's ``notes`` which figure kinds this run's metrics give no figure of, and why:
        each kind the run file asks for by name; of the default list, only when it gives none at all."""
        notes = figure_notes(results, kinds)
        if not explicit and kinds and len(notes) == len(set(kinds)):
            have = ", ".join(dict.fromkeys([*results.metrics,
                                            *(k.rsplit("/", 1)[1] for k in results.arrays if not is_view(k))]))
            notes = [f"No figures: no figure kind ({', '.join(kinds)}) draws what this run's metrics ({have}) give."]
        elif not explicit:
            notes = []
        if notes:
            record.add_notes(notes)

    def write_report(self, rd: RunDir, results: Results, record: RunRecord, cfg: Any,
                     status: str) -> tuple[Any, Path | None]:
        """``contrasts.csv`` and ``report.html`` (in the manifest); a failure is recorded in ``record``,
        never raised. The page shows ``status``, what run.json will say once the run finishes, and the
        time it was written as the run's end (run.json's ``finished`` follows within moments)."""
        t0 = time.perf_counter()
        table = html = None
        try:
            groups = record_groups(record, results.models, cfg.report.group_by)
            table = contrasts(results, groups, inference=cfg.report.inference, seed=cfg.seed)
            write_text_atomic(rd.output("contrasts.csv"), table.to_csv(index=False, float_format="%.6g"))
            record.timing("contrasts_s", time.perf_counter() - t0)
            t0 = time.perf_counter()
            shown = record.model_copy(update={"status": status, "finished": now()})
            html = write_report(rd.path, record=shown, results=results, contrasts=table, path=rd.output("report.html"))
            record.timing("report_s", time.perf_counter() - t0)
        except WriteError:
            raise  # a full disk or unwritable directory is the run's error, as for every output
        except Exception as exc:  # the report is a view: its failure never costs the numbers
            record.report_error = f"{type(exc).__name__}: {exc}"
            for name in ("contrasts.csv", "report.html"):  # none of an earlier run stays beside these results
                if name in rd.outputs:
                    rd.outputs.remove(name)
                rd.remove(name)  # (only a probekit run's file)
        return table, html


def redraw(run_dir: str | Path, kinds: list[str] | None = None, metrics: list[str] | None = None,
           notes: list[str] | None = None) -> list[Path]:
    """Draw figures of a finished run directory (``probekit plot``) and add them to its manifest.

    ``notes``, when given, receives one line for each of the ``kinds`` asked for by name that
    the directory's metrics give no figure of, saying why.

    Raises:
        RunDirError: the directory does not hold one finished run (see :func:`read_record`).
        ConfigError: a metric the directory does not hold.
    """
    rd = open_run_dir(run_dir)
    read_record(rd.where)  # before the lock: never create a directory that is not there
    with rd.locked():
        record = read_record(rd.where)
        rd.adopt(record)  # figures it draws join what the directory's runs own
        res = load_run_dir(rd.where)
        if metrics:
            have = list(dict.fromkeys([*res.metrics, *(k.rsplit("/", 1)[1] for k in res.arrays if not is_view(k))]))
            missing = [m for m in metrics if m not in have]
            if missing:
                raise ConfigError(f"No metric {', '.join(missing)} in {rd.path}; it holds: {', '.join(have)}.")
        paths = rd.draw_figures(res, render_all, keep_others=True, kinds=None if kinds is None else list(kinds),
                                metrics=metrics)  # maps over the input views stored with them: no model
        if notes is not None and kinds:
            notes.extend(figure_notes(res, kinds, metrics))
        drawn = {str(p.relative_to(rd.path)): file_digest(p) for p in paths}
        record.manifest = {**(record.manifest or {}), **drawn}
        record.figures = sorted(set(record.figures or []) | set(drawn))
        rd.write_record(record)
    return [rd.public(p) for p in paths]  # (an s3:// run directory's: their addresses in the store)
