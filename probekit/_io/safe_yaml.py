"""YAML as probekit reads it: safe (no tags that build objects) and with every key once.

PyYAML keeps the last of two equal keys in a mapping and says nothing, so a run file with
``images:`` twice probes only the second folder, and a repeated ``models:`` silently replaces the
first list. Every mapping, at any depth, is checked here; a repeat is refused with the lines of
both. A YAML merge (``<<: *base`` followed by a key that overrides a merged one) is how YAML
overrides on purpose and is not a repeat.
"""

from __future__ import annotations

from typing import Any

import yaml

from probekit.errors import ConfigError

__all__ = ["load_yaml", "DuplicateKeyError"]

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one mapping: ``key``, and the 1-based lines of both."""

    def __init__(self, key: Any, first: int, second: int, mark):
        self.key, self.first, self.second = key, first, second
        super().__init__(None, None, f"`{key}` is given twice (first at line {first})", mark)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:  # before merges are flattened in: explicit keys only
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader refuses it below, with its own message
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(key, first.start_mark.line + 1, key_node.start_mark.line + 1,
                                            key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """``text`` parsed safely, every mapping's keys unique.

    Raises:
        ConfigError: a key repeated in one mapping: ``"<source> line 4: `images` is given twice
            (first at line 2); ..."``, one line.
        yaml.YAMLError: any other syntax error (callers say where, as for any YAML).
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{source} line {exc.second}: `{exc.key}` is given twice (first at line {exc.first}); "
                          "YAML would silently keep only the last one. Remove or rename one of them.") from None
