"""Map arrays keep their ``model/metric`` keys for any model label (issue 19, item 6).

The arrays file once encoded ``/`` as ``__``, so a label with ``__`` in it came back split at the
wrong place (``vit__tiny/cls_map`` read as ``vit/tiny/cls_map``) in ``load_run_dir``, the maps
figure and a cached rerun. Keys are now stored verbatim (as JSON beside the arrays, no pickle).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from probekit.api import compare
from probekit.results import Results
from probekit.runs.rundir import load_run_dir

HOSTILE = ["vit__tiny", "__", "a__b__c", "hf:facebook/dino-vits16", "x/__/y", "tr ailing__", "ünï 模型 🙂",
           "keys", "a.b", "<!--<script>"]


@pytest.mark.parametrize("label", HOSTILE)
def test_array_keys_round_trip_for_any_model_label(tmp_path, label):
    rng = np.random.default_rng(0)
    arrays = {f"{label}/cls_map": rng.random((2, 3, 4, 4)).astype(np.float32),
              f"{label}/rollout": rng.random((2, 3, 4, 4)).astype(np.float32),
              "other/cls_map": rng.random((2, 3, 4, 4)).astype(np.float32)}
    Results(pd.DataFrame(), arrays).save_arrays(tmp_path / "a.npz")
    back = Results.read_arrays(tmp_path / "a.npz")
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)


def test_arrays_written_before_the_keys_were_stored_still_read(tmp_path):
    arr = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez_compressed(tmp_path / "old.npz", **{"deit-s__cls_map": arr, "hf:facebook__dino__rollout": arr})
    back = Results.read_arrays(tmp_path / "old.npz")
    assert sorted(back) == ["deit-s/cls_map", "hf:facebook/dino/rollout"]
    # knowing the labels resolves what the old encoding could not
    back = Results.read_arrays(tmp_path / "old.npz", models=["hf:facebook__dino"])
    assert sorted(back) == ["deit-s/cls_map", "hf:facebook__dino/rollout"]


def test_a_label_with_double_underscore_keeps_its_maps_in_the_run_dir_figure_and_cached_rerun(tmp_path, toy_backend,
                                                                                             run_file):
    p = run_file(name="keys", models=[{"model": "toy:vit", "label": "vit__tiny"}, {"model": "toy:vit", "label": "a/b c"}],
                 metrics=["mad", "cls_map"], batch_size=2, figures=["maps"])
    first = compare(p, out=tmp_path / "out", report=False)
    want = sorted(f"{m}/{k}" for m in ("vit__tiny", "a/b c") for k in ("cls_map", "#input", "#names"))  # maps, input views, their names
    assert sorted(first.results.arrays) == want
    assert sorted(load_run_dir(tmp_path / "out").arrays) == want
    assert [f.name for f in first.figures] == ["maps_cls_map.png", "maps_cls_map.svg"]
    again = compare(p, out=tmp_path / "out", report=False)
    assert sorted(again.cached) == ["a/b c", "vit__tiny"]
    assert sorted(again.results.arrays) == want
    for k in want:
        np.testing.assert_array_equal(again.results.arrays[k], first.results.arrays[k])
    # the cached part itself stores its key verbatim
    parts = sorted((tmp_path / "out" / "parts").glob("*.npz"))
    keys = set()
    for f in parts:
        keys |= set(Results.read_arrays(f))
    assert keys and keys <= set(want)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "complete"
