"""Write benchmarks/RESULTS.md from the results files in benchmarks/results/*.json.

    python benchmarks/results.py            # rewrite RESULTS.md
    python benchmarks/results.py --check    # exit 1 if RESULTS.md is not what the files give

Figures measured by the benchmarks live here, not in docstrings: a docstring states the rule and
points to a section of RESULTS.md. To update a section, run its benchmark with ``--json
benchmarks/results/NAME.json`` (the format is benchmarks/_record.py's), then this script. A file
whose ``recorded`` is true holds figures copied from an earlier run's notes (README, docstrings,
commit messages), not a script's own ``--json`` output; its section says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _record import KEYS

HEADER = """\
# Benchmark results

Written by `python benchmarks/results.py` from `benchmarks/results/*.json`; do not edit by hand.
To update a section, run its benchmark with `--json benchmarks/results/NAME.json`, then
`python benchmarks/results.py`. Sections marked *recorded* hold figures copied from the notes of
earlier runs (README, docstrings, commit messages), not re-measured since; the machine is this
project's shared 2-core CPU VM unless a section says otherwise, and its run-to-run noise is large
(the plain forward alone ranges up to +-30% within one process).
"""


def load(path: Path) -> dict:
    """One results file, checked: every key of benchmarks/_record.py, rows keyed by the columns."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path.name}: not JSON ({e}).") from None
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise SystemExit(f"{path.name}: missing {', '.join(missing)} (a results file has {', '.join(KEYS)}).")
    for i, row in enumerate(record["rows"]):
        extra = set(row) - set(record["columns"])
        if extra:
            raise SystemExit(f"{path.name}: row {i} has {', '.join(sorted(extra))}, not among its columns.")
    return record


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def section(record: dict, name: str) -> str:
    lines = [f"## {record['title']}", ""]
    if record["recorded"]:
        lines += ["*Recorded from earlier runs: copied from their notes, not re-measured since.*", ""]
    lines += [f"- command: `{record['command']}`" if record["command"] else "- command: not recorded",
              f"- date: {record['date'] or 'not recorded'}",
              f"- machine: {record['machine']}",
              f"- source: {record['source']} (`benchmarks/results/{name}`)", ""]
    cols = record["columns"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in record["rows"]]
    if record["notes"]:
        lines += [""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


def render(folder: Path = HERE / "results") -> str:
    """RESULTS.md's text: a contents list, then a section per file (sorted by file name)."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SystemExit(f"no results files in {folder}.")
    records = [(p.name, load(p)) for p in files]
    contents = [f"- {r['title']}" for _, r in records]
    return "\n".join([HEADER, *contents, ""] + [section(r, name) for name, r in records])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md differs from what the files give")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run python benchmarks/results.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
