"""Results files: parquet and CSV round trips are exact (values, dtypes, provenance), arrays too."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from probekit.results import Results


def _results(seed: int = 0) -> Results:
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("deit-s", "dino-s16"):
        for img in ("a.jpg", "b c.png", "sub/d,e.jpg"):  # spaces and commas survive CSV
            for layer in range(3):
                for head in (-1, 0, 1) if layer == 0 else (0, 1):
                    rows.append((model, img, layer, head, "mad", rng.normal(100, 30)))
                rows.append((model, img, layer, 0, "mad[units=patch]", rng.random() / 3))  # not short decimals
    table = pd.DataFrame(rows, columns=["model", "image", "layer", "head", "metric", "value"])
    meta = {"model": "deit-s", "layout": {"num_prefix": 1, "grid": [14, 14], "patch_size": [16, 16]},
            "metrics": {"mad": {"name": "mad", "options": {"renormalize": False, "units": "px"}, "unit": "px"}},
            "images": {"count": 3, "fingerprint": "0123abcd", "skipped": [["x.txt", "not an image"]]},
            "seconds": 1.25, "nested": {"list": [1, 2.5, None, True]}}
    return Results(table, {"deit-s/cls_map": rng.random((3, 2, 4, 4)).astype(np.float32)}, meta)


def test_parquet_round_trip_is_exact(tmp_path):
    res = _results()
    path = res.to_parquet(tmp_path / "r.parquet")
    back = Results.read_parquet(path)
    pd.testing.assert_frame_equal(back.table, res.table, check_exact=True)
    assert back.meta == res.meta
    assert back == res
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away


def test_csv_round_trip_is_exact(tmp_path):
    res = _results(1)
    back = Results.read_csv(res.to_csv(tmp_path / "r.csv"))
    pd.testing.assert_frame_equal(back.table, res.table, check_exact=True)
    assert back.meta == res.meta
    # a value that a short float format would change: 17 significant digits keep every bit
    assert (back.table["value"].to_numpy() == res.table["value"].to_numpy()).all()


# regression: CSV round trips failed on NaN values (head_similarity of a one-head layer)
def test_csv_round_trips_nan_values_and_na_names(tmp_path):
    table = pd.DataFrame({"model": ["NA", "NA"], "image": ["a", "None"], "layer": [0, 0], "head": [0, 1],
                          "metric": ["head_similarity"] * 2, "value": [np.nan, 0.25]})
    res = Results(table)
    back = Results.read_csv(res.to_csv(tmp_path / "r.csv"))
    pd.testing.assert_frame_equal(back.table, res.table)


def test_arrays_round_trip(tmp_path):
    res = _results()
    back = Results.read_arrays(res.save_arrays(tmp_path / "arrays.npz"))
    assert back.keys() == res.arrays.keys()
    np.testing.assert_array_equal(back["deit-s/cls_map"], res.arrays["deit-s/cls_map"])


def test_summary_is_the_t_interval_over_images():
    res = _results()
    s = res.summary()
    t = res.table
    vals = t[(t.model == "dino-s16") & (t.metric == "mad") & (t.layer == 2) & (t["head"] == 1)]["value"].to_numpy()
    row = s[(s.model == "dino-s16") & (s.metric == "mad") & (s.layer == 2) & (s["head"] == 1)].iloc[0]
    half = stats.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals))
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(vals.mean(), rel=1e-12)
    assert row["ci_high"] - row["mean"] == pytest.approx(half, rel=1e-9)
    assert row["mean"] - row["ci_low"] == pytest.approx(half, rel=1e-9)


def test_concat_keeps_each_models_layout_for_plots():
    a, b = _results(), _results(2)
    b.meta = {**b.meta, "model": "dino-s16", "layout": {"num_prefix": 5, "grid": [16, 16], "patch_size": [14, 14]}}
    both = Results.concat([a, b])
    assert len(both) == len(a) + len(b)
    assert both.meta["models"]["deit-s"]["layout"]["grid"] == [14, 14]
    assert both.meta["models"]["dino-s16"]["layout"]["num_prefix"] == 5
    assert both.meta["metrics"]["mad"]["unit"] == "px"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from probekit._io.atomic import atomic_path

    target = tmp_path / "summary.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.csv"]
    with atomic_path(target, suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz") and tmp.parent == tmp_path
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_concat_keeps_one_per_model_record_with_training_dtype_and_device():
    # one helper builds the per-model record for concat and for run directories (they differed)
    from probekit.results import models_meta

    parts = [Results(pd.DataFrame({"model": ["a"], "image": ["x"], "layer": [0], "head": [0], "metric": ["mad"],
                                   "value": [1.0]}),
                     meta={"model": "a", "spec": "toy:vit", "training": "random init", "dtype": "torch.float32",
                           "device": "cpu"})]
    meta = Results.concat(parts).meta["models"]
    assert meta == models_meta(parts)
    assert (meta["a"]["training"], meta["a"]["dtype"], meta["a"]["device"]) == ("random init", "torch.float32", "cpu")
