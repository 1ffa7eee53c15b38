"""benchmarks/RESULTS.md is what benchmarks/results/*.json give, and every pointer to it names a section."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _results_module():
    spec = importlib.util.spec_from_file_location("probekit_bench_results", ROOT / "benchmarks" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_md_is_written_from_the_results_files():
    text = _results_module().render()
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == text, "run python benchmarks/results.py"


def test_every_docstring_pointer_names_a_section_of_results_md():
    sections = set(re.findall(r"^## (.+)$", (ROOT / "benchmarks" / "RESULTS.md").read_text(), re.M))
    pointers = {}
    for path in [*(ROOT / "probekit").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        source = " ".join(path.read_text().split())  # a pointer may wrap over lines
        for name in re.findall(r'RESULTS\.md, section "([^"]+)"', source):
            pointers.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    assert pointers, "no docstring points to benchmarks/RESULTS.md"
    missing = {name: files for name, files in pointers.items() if name not in sections}
    assert not missing, f"pointers to sections RESULTS.md does not have: {missing}"
