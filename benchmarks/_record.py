"""The ``--json`` file a benchmark writes: one section of benchmarks/RESULTS.md.

A results file is a JSON object: ``title`` (the section's heading, which docstrings point to),
``script``, ``command``, ``date``, ``machine``, ``source`` (who measured it, and where the figures
were first written), ``recorded`` (true: figures copied from an earlier run's notes, not this
script's own output), ``notes`` (lines shown under the table), ``columns`` and ``rows`` (one
object per row, keyed by column). ``python benchmarks/results.py`` turns every file in
benchmarks/results/ into RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

KEYS = ("title", "script", "command", "date", "machine", "source", "recorded", "notes", "columns", "rows")


def machine() -> str:
    """The processor, core count and 1-minute load average (the numbers move with the load)."""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f}")


def write(path: str | Path, title: str, columns: list[str], rows: list[dict], notes: list[str] = (),
          machine_note: str | None = None, **extra) -> None:
    """Write one results file for ``rows`` measured by the running script (``recorded: false``).

    ``extra`` keys (e.g. ``raw``: the unsummarized measurements) are kept in the file, not shown.
    """
    script = Path(sys.argv[0])
    record = {
        "title": title,
        "script": f"benchmarks/{script.name}",
        "command": "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{script.name}", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": machine_note or machine(),
        "source": f"benchmarks/{script.name} --json",
        "recorded": False,
        "notes": list(notes),
        "columns": list(columns),
        "rows": [{c: r.get(c) for c in columns} for r in rows],
        **extra,
    }
    Path(path).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}", file=sys.stderr)
