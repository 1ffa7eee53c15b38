"""The Triton path of :func:`probekit.testing.paths.check_engine_paths`, in a child process started with
``TRITON_INTERPRET=1``: ``python -m probekit.testing._triton_child module:Class '{options}'`` prints the
per-image values of the kit's global case as JSON."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from probekit.testing.paths import _B, _LAYOUT, GLOBAL_PATHS, _engine, _qkv


def main(target: str, options: str) -> None:
    module, qualname = target.split(":")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    metric = cls(**json.loads(options))
    case = _qkv(_B, _LAYOUT.num_tokens, _LAYOUT.num_tokens, seed=11)
    print(json.dumps(_engine(metric, case, _LAYOUT, **GLOBAL_PATHS["the Triton kernel's per-row sums"]).tolist()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
