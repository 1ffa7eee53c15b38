"""Figures are redrawn only when what they are drawn from changed (a cached rerun draws nothing)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from probekit.views import plots
from probekit.results import Results


def _results(shift: float = 0.0) -> Results:
    rng = np.random.default_rng(0)
    rows = [(m, f"im{i}", l, h, metric, 50 + rng.normal() + (shift if metric == "entropy" else 0))
            for m in ("a", "b") for i in range(3) for l in range(3) for h in range(2) for metric in ("mad", "entropy")]
    meta = {"models": {m: {"training": "t", "layout": {"num_prefix": 1, "grid": [4, 4], "patch_size": [8, 8]}} for m in "ab"},
            "metrics": {"mad": {"name": "mad", "unit": "px"}, "entropy": {"name": "entropy", "unit": "nats"}}}
    return Results(pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value"]), meta=meta)


def test_only_changed_figures_are_redrawn(tmp_path):
    kinds = ["depth", "overlay"]
    first = plots.render_all(_results(), tmp_path, kinds=kinds)
    assert [p.name for p in first] == ["depth_mad.png", "depth_mad.svg", "overlay_mad.png", "overlay_mad.svg",
                                       "depth_entropy.png", "depth_entropy.svg", "overlay_entropy.png",
                                       "overlay_entropy.svg"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    again = plots.render_all(_results(), tmp_path, kinds=kinds)
    assert again == first and {p.name: p.stat().st_mtime_ns for p in again} == mtimes  # nothing redrawn
    changed = plots.render_all(_results(shift=3.0), tmp_path, kinds=kinds)
    now = {p.name: p.stat().st_mtime_ns for p in changed}
    redrawn = sorted(n for n in now if now[n] != mtimes[n])
    assert redrawn == ["depth_entropy.png", "depth_entropy.svg", "overlay_entropy.png", "overlay_entropy.svg"]
    (tmp_path / "depth_mad.svg").unlink()  # a lost file is drawn again
    plots.render_all(_results(shift=3.0), tmp_path, kinds=kinds)
    assert (tmp_path / "depth_mad.svg").exists()
