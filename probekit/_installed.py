"""What is installed: library versions (:func:`library_versions`), and a plugin class's string
constants read from its source without importing it (:func:`class_constants`).

Why: ``probekit metrics`` lists every metric's one-line description, and importing a metric's
module imports torch (seconds). The constants a listing needs (``description``, ``unit``,
``display_name``) are plain string literals in the class body, so the listing reads them from
the module's syntax tree; a class that computes them or inherits them is imported as before.
"""

from __future__ import annotations

import ast
import importlib.util
import platform
from functools import cache, lru_cache

__all__ = ["class_constants", "library_versions"]


@cache
def _tree(module: str) -> ast.Module | None:
    try:
        spec = importlib.util.find_spec(module)  # imports the parent packages only
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        with open(spec.origin, encoding="utf-8") as f:
            return ast.parse(f.read(), filename=spec.origin)
    except (ImportError, OSError, SyntaxError, ValueError):
        return None


def class_constants(target: str, names: tuple[str, ...], base: str = "",
                    defaults: dict | None = None) -> dict[str, str] | None:
    """``{name: value}`` for the string literals ``names`` in the class ``"module:Class"`` names.

    A name the class body does not set is looked for in its base when that is a class of the same
    module (one base, up the chain), and takes ``defaults[name]`` once the chain reaches a class
    that derives from ``base`` alone (the contract class, whose defaults the caller knows).

    Returns None when the module cannot be read or any of ``names`` is neither a literal of the
    class body nor a default of a direct subclass of ``base`` (then the caller imports the class).

    >>> class_constants("probekit._installed:Nothing", ("description",)) is None
    True
    """
    module, _, qual = target.partition(":")
    tree = _tree(module)
    if tree is None or not qual or "." in qual:
        return None
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    found: dict[str, str] = {}
    seen: set[str] = set()
    while qual in classes and qual not in seen:  # the class, then its base while that is a class of the module
        seen.add(qual)
        cls = classes[qual]
        for node in cls.body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            value = getattr(node, "value", None)
            for t in targets:
                if (isinstance(t, ast.Name) and t.id in names and t.id not in found
                        and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                    found[t.id] = value.value
        bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None) for b in cls.bases]
        if base and bases == [base]:
            found = {**{k: v for k, v in (defaults or {}).items() if k in names}, **found}
            break
        qual = bases[0] if len(bases) == 1 and bases[0] else ""
    return found if seen and all(n in found for n in names) else None


def library_versions() -> dict[str, str]:
    """Python's and the versions of probekit and the model libraries, as a part's cache key and
    run.json record them (a fresh dict: callers may add to it)."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    """Looked up once per process: each lookup parses package metadata (~1 ms a package)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("probekit", "torch", "transformers", "timm", "open_clip_torch", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
