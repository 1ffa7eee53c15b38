"""The local engine in shards (probekit.runs.shards): a set larger than ``resources.shard_size`` is
probed shard by shard, each shard sealed as a part as soon as it is done, and the model's whole-set
part joined from them with its rows streamed from the shard files.

The reference is the same run in one call per model (the default shard, larger than the set). A
shard is whole batches, so per-image rows are the same to the last bit; whole-set metrics (k-NN)
make their rows from the states merged in image order, equal too; CKA's float64 sums are added in
another grouping (relative 1e-12). A truncated JPEG inside a shard is skipped and recorded as
in one call; an interrupted run resumes from the sealed shards without computing them again.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import probekit as pk
from probekit.api import compare

METRICS = ["mad", "entropy", {"name": "knn", "options": {"folds": 2, "k": 3}}, "cka"]
COLS = ["model", "image", "layer", "head", "metric", "value", "label"]


@pytest.fixture
def tree(tmp_path):
    """22 readable images in three class folders and one truncated JPEG (in the second shard of 8)."""
    root = tmp_path / "classes"
    rng = np.random.default_rng(0)
    for i in range(22):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    good = next(p for p in pk.sample_images() if p.suffix.lower() in (".jpg", ".jpeg"))
    data = good.read_bytes()
    (root / "c1" / "img11_cut.jpg").write_bytes(data[: len(data) // 2])  # a download cut short
    return root


def _run(run_file, tree, out, file="run.yaml", **keys):
    run = run_file(models=["toy:vit"], images={"kind": "classes", "path": str(tree)}, metrics=METRICS,
                   batch_size=4, file=file, **keys)
    return compare(run, out=out)


def _rows(cmp) -> pd.DataFrame:
    t = cmp.results.table[COLS].astype({"model": str, "image": str, "metric": str, "label": str})
    return t.sort_values(COLS[:5]).reset_index(drop=True)


@pytest.mark.usefixtures("toy_backend")
def test_shards_give_the_one_call_results_and_leave_only_the_whole_parts(run_file, tree, tmp_path, monkeypatch):
    import probekit.engine.probe as engine_probe

    real, calls = engine_probe.probe, []
    monkeypatch.setattr(engine_probe, "probe", lambda pm, images, *a, **kw: (
        calls.append((len(images), kw.get("partial", False))), real(pm, images, *a, **kw))[1])
    one = _run(run_file, tree, tmp_path / "one")
    sharded = _run(run_file, tree, tmp_path / "sharded", file="r2.yaml", resources={"shard_size": 6})
    assert calls == [(23, False), (8, True), (8, True), (7, True)]  # 6 images in whole batches of 4: 8
    assert one.ok and sharded.ok
    pd.testing.assert_frame_equal(_rows(sharded), _rows(one))  # every row, k-NN's included, to the last bit
    assert set(_rows(one)["metric"]) == {"mad", "entropy", "knn[folds=2,k=3]"}
    np.testing.assert_allclose(sharded.results.arrays["toy:vit/cka"], one.results.arrays["toy:vit/cka"], rtol=1e-12)
    for d in ("one", "sharded"):
        rec = json.loads((tmp_path / d / "run.json").read_text())
        assert rec["images"]["skipped"] == [["c1/img11_cut.jpg", "cannot be decoded"]]
        assert rec["images"]["count"] == 23
    # shard_size 6 in whole batches of 4 is 8: 3 shards; each sealed, then joined and dropped
    parts = sorted(p.name for p in (tmp_path / "sharded" / "parts").glob("*.parquet"))
    assert len(parts) == len(METRICS)  # (3 shards x 4 metrics more while it ran)
    meta = pk.Results.scan(tmp_path / "sharded" / "parts" / parts[0]).meta
    assert meta["engine"] == "local" and meta["images"]["count"] == 22 and "state" not in meta
    summary = [pd.read_csv(tmp_path / d / "summary.csv") for d in ("one", "sharded")]
    pd.testing.assert_frame_equal(summary[1], summary[0])


@pytest.mark.usefixtures("toy_backend")
def test_an_interrupted_sharded_run_resumes_from_the_sealed_shards(run_file, tree, tmp_path, monkeypatch):
    import probekit.engine.probe as engine_probe

    real = engine_probe.probe
    calls: list[int] = []
    stopped: list[bool] = []

    def counted(pm, images, *a, **kw):
        calls.append(len(images))
        if len(calls) == 3 and kw.get("partial") and not stopped:  # the third shard, once: the process is stopped
            stopped.append(True)
            raise KeyboardInterrupt
        return real(pm, images, *a, **kw)

    monkeypatch.setattr(engine_probe, "probe", counted)
    with pytest.raises(KeyboardInterrupt):
        _run(run_file, tree, tmp_path / "out", resources={"shard_size": 8})
    sealed = list((tmp_path / "out" / "parts").glob("*.seal.json"))
    assert len(sealed) == 2 * len(METRICS)  # two shards x four metrics, no whole part yet
    calls.clear()
    again = _run(run_file, tree, tmp_path / "out", resources={"shard_size": 8})
    assert calls == [7]  # only the last shard: 7 of 23 images
    monkeypatch.setattr(engine_probe, "probe", real)
    one = _run(run_file, tree, tmp_path / "one", file="r2.yaml")
    pd.testing.assert_frame_equal(_rows(again), _rows(one))
    assert len(list((tmp_path / "out" / "parts").glob("*.seal.json"))) == len(METRICS)  # shard parts gone once joined
