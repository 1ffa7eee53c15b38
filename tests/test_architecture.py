"""The architecture the README describes, kept: one-way layers (also `lint-imports` in CI), no
import cycle, the core never importing a built-in plugin, and a top level that stays small."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import probekit

PACKAGE = Path(probekit.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(path: Path, module: str) -> set[str]:
    """Every module ``module`` imports, at module level or inside functions (absolute names)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_the_core_never_imports_a_built_in_plugin():
    offenders = {m: sorted(i for i in _imported(p, m) if i.startswith("probekit.plugins"))
                 for m, p in _modules().items()}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("probekit", include_external_packages=False)
    cycles = []
    for m in sorted(graph.modules):
        for other in graph.find_modules_directly_imported_by(m):
            if other != m and graph.chain_exists(importer=other, imported=m):
                cycles.append((m, other, graph.find_shortest_chain(importer=other, imported=m)))
    assert cycles == []


def test_the_top_level_holds_at_most_15_modules_and_each_sub_package_says_what_it_holds():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 15, top
    for init in PACKAGE.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"
