"""The self-contained HTML report of a run directory (``report.html``) and its attention explorer.

- :mod:`probekit.views.report.build`: the page (numbers, contrasts, provenance, explorer data inline);
- the explorer's arrays are captured while a model is loaded (:mod:`probekit.runs.explorer`).
"""

from __future__ import annotations

from pathlib import Path

from probekit.views.report.build import record_groups, write_report

__all__ = ["write_report", "rebuild", "record_groups"]


def rebuild(run_dir: str | Path) -> Path:
    """(Re)write ``report.html`` of a finished run directory (``probekit report``), and
    ``contrasts.csv`` when the run has none; both join the directory's manifest.

    Raises:
        RunDirError: the directory does not hold one finished run.
    """
    from probekit._io.fileid import file_digest
    from probekit.runs.rundirs import load_run_dir, open_run_dir, read_record
    from probekit.views.contrasts import contrasts

    rd = open_run_dir(run_dir)
    read_record(rd.where)  # before the lock: never create a directory that is not there
    with rd.locked():
        record = read_record(rd.where)
        rd.adopt(record)  # only files the directory's runs wrote are replaced
        results = load_run_dir(rd.where)
        by = record.report.group_by if record.report is not None else "training"
        groups = record_groups(record, results.models, by)
        inference = (record.config.get("report") or {}).get("inference", "images")  # older runs: images
        table = contrasts(results, groups, inference=inference, seed=record.config.get("seed", 0))
        csv = rd.path / "contrasts.csv"
        if "contrasts.csv" not in (record.manifest or {}):
            from probekit._io.atomic import write_text_atomic

            write_text_atomic(rd.output("contrasts.csv"), table.to_csv(index=False, float_format="%.6g"))
        path = write_report(rd.path, record, results, table, path=rd.output("report.html"))
        record.manifest = {**(record.manifest or {}), **{p.name: file_digest(p) for p in (csv, path) if p.is_file()}}
        rd.write_record(record)  # (an s3:// run directory uploads them first)
    return rd.public(path)
