"""results.parquet as a partitioned dataset (issue 24): parts written where computed, read as one
table by pandas and pyarrow, summaries and contrasts from per-part reads, and run directories
of the single-file layout still read.

Tables are synthetic (seeded) except the run-directory tests, which use the toy ViT of tests/_toy.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from probekit.api import compare
from probekit.errors import RunDirError
from probekit.results import COLUMNS, Results, summarize
from probekit.results.dataset import INDEX, DatasetWriter, ResultsScan
from probekit.runs.rundir import load_run_dir, read_record
from probekit.views.contrasts import per_image_layer

MODELS = ["vit/b 16", "dino%v2"]  # labels that need encoding in a folder name


def _table(seed: int = 0, images: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [(m, f"img{i}", layer, head, metric, float(rng.normal(layer, 1.0)))
            for m in MODELS for metric in ("mad", "entropy") for i in range(images)
            for layer in range(3) for head in ((-1,) if metric == "entropy" else (0, 1))]
    t = pd.DataFrame(rows, columns=COLUMNS)
    t.loc[5, "value"] = np.nan
    t.loc[40, "value"] = np.inf
    t["label"] = t["image"].map(lambda n: "cat" if int(n[3:]) % 2 else "dog")
    return Results(t).table


def _written(tmp_path, table: pd.DataFrame, shards: int = 1):
    """``table`` written as a dataset, each model x metric split into ``shards`` parts."""
    w = DatasetWriter(tmp_path / "results.parquet")
    for (model, metric), g in table.groupby(["model", "metric"], observed=True, sort=False):
        for s, rows in enumerate(np.array_split(np.arange(len(g)), shards)):
            w.write(g.iloc[rows], str(model), str(metric), s)
    w.commit({"name": "synthetic"})
    return tmp_path / "results.parquet"


def _canon(t: pd.DataFrame) -> pd.DataFrame:
    t = Results(t).table.astype({"model": str, "metric": str, "image": str, **({"label": str} if "label" in t else {})})
    return t.sort_values(["model", "metric", "image", "layer", "head"]).reset_index(drop=True)


def test_pandas_pyarrow_and_results_read_the_folder_as_one_table(tmp_path):
    table = _table()
    root = _written(tmp_path, table, shards=2)
    assert (root / "model=vit%2Fb%2016" / "metric=mad" / "part-00001.parquet").is_file()
    pd.testing.assert_frame_equal(_canon(pd.read_parquet(root)), _canon(table))
    arrow = ds.dataset(root, format="parquet", partitioning="hive").to_table().to_pandas()
    arrow["model"] = arrow["model"].map(lambda s: __import__("urllib.parse").parse.unquote(s))
    pd.testing.assert_frame_equal(_canon(arrow), _canon(table))
    back = Results.read_parquet(root)  # the writer's order, and the index's provenance
    pd.testing.assert_frame_equal(back.table, table, check_exact=True)
    assert back.meta == {"name": "synthetic"}


def test_scan_summaries_contrasts_and_nonfinite_equal_the_in_memory_ones(tmp_path):
    table = _table(seed=3, images=9)
    scan = Results.scan(_written(tmp_path, table, shards=3))  # three shards per part: moments merged
    mem = summarize(table)
    got = scan.summary()
    assert list(got.columns) == list(mem.columns)
    pd.testing.assert_frame_equal(got.astype({"model": str, "metric": str}), mem.astype({"model": str, "metric": str}),
                                  check_exact=False, rtol=1e-12, atol=1e-12)
    by_label = scan.summary(("model", "metric", "label"))
    pd.testing.assert_frame_equal(by_label.astype({"model": str, "metric": str}),
                                  summarize(table, ("model", "metric", "label")).astype({"model": str, "metric": str}),
                                  rtol=1e-12, atol=1e-12)
    for metric in ("mad", "entropy"):
        pd.testing.assert_series_equal(scan.per_image_layer(metric), per_image_layer(table, metric),
                                       check_names=False, rtol=1e-15, atol=0)
    assert scan.nonfinite() == Results(table).nonfinite()


def test_a_scan_is_filtered_before_it_reads(tmp_path):
    table = _table()
    scan = Results.scan(_written(tmp_path, table))
    part = scan.filter(models=["dino%v2"], metrics=["mad"], layers=[0, 2])
    assert [p.path for p in part.parts()] == ["model=dino%25v2/metric=mad/part-00000.parquet"]
    want = table[(table["model"] == "dino%v2") & (table["metric"] == "mad") & table["layer"].isin([0, 2])]
    pd.testing.assert_frame_equal(part.to_results().table, Results(want.reset_index(drop=True)).table)
    assert (scan.models, part.metrics) == (MODELS, ["mad"])


def test_a_run_writes_the_folder_and_reads_lazily(tmp_path, toy_backend, run_file):
    run = {"name": "ds", "models": [{"model": "toy:vit", "label": "a/b"}, {"model": "toy:vit", "label": "c"}],
           "images": {"path": "sample", "count": 3}, "metrics": ["mad", "entropy"], "batch_size": 3, "figures": []}
    out = tmp_path / "out"
    cmp = compare(run_file(run), out=out, report=False)
    rec = read_record(out)
    parts = sorted(n for n in rec.manifest if n.startswith("results.parquet/"))
    assert len(parts) == 5 and f"results.parquet/{INDEX}" in parts  # 2 models x 2 metrics, and the index
    lazy = load_run_dir(out)
    assert lazy._table is None and lazy.models == ["a/b", "c"] and len(lazy) == len(cmp.results)
    pd.testing.assert_frame_equal(lazy.summary(), summarize(cmp.results.table), check_exact=True)
    pd.testing.assert_frame_equal(_canon(lazy.table), _canon(pd.read_parquet(out / "results.parquet")))
    assert pd.read_csv(out / "summary.csv")["n"].sum() == len(cmp.results) - sum(
        n["values"] for n in cmp.nonfinite)


def test_a_single_file_run_of_an_earlier_version_reads_and_is_converted_by_the_next_run(tmp_path, toy_backend,
                                                                                          run_file):
    from probekit._io.fileid import file_digest

    run = {"name": "old", "models": [{"model": "toy:vit", "label": "toy"}], "images": {"path": "sample", "count": 2},
           "metrics": ["mad"], "batch_size": 2, "figures": []}
    out = tmp_path / "out"
    cmp = compare(run_file(run), out=out, report=False)
    table = cmp.results.table
    # the layout before issue 24: one results.parquet file, as Results.to_parquet wrote it, in the manifest
    import shutil

    shutil.rmtree(out / "results.parquet")
    Results(table, meta=cmp.results.meta).to_parquet(out / "results.parquet")
    rj = json.loads((out / "run.json").read_text())
    rj["manifest"] = {k: v for k, v in rj["manifest"].items() if not k.startswith("results.parquet/")}
    rj["manifest"]["results.parquet"] = file_digest(out / "results.parquet")
    rj["owned"] = sorted({n for n in rj["owned"] if not n.startswith("results.parquet/")} | {"results.parquet"})
    (out / "run.json").write_text(json.dumps(rj))
    old = load_run_dir(out)
    pd.testing.assert_frame_equal(old.table, table, check_exact=True)
    pd.testing.assert_frame_equal(Results.scan(out).summary(), summarize(table), check_exact=True)
    # the next run into it replaces the file a probekit run wrote with the folder; a user's note stays
    (out / "notes.txt").write_text("mine")
    again = compare(run_file(run), out=out, report=False)
    assert (out / "results.parquet").is_dir() and (out / "notes.txt").read_text() == "mine"
    pd.testing.assert_frame_equal(load_run_dir(out).table, again.results.table, check_exact=True)


def test_stale_parts_are_replaced_or_removed_only_when_a_probekit_run_wrote_them(tmp_path, toy_backend, run_file):
    run = {"name": "st", "models": [{"model": "toy:vit", "label": "a"}, {"model": "toy:vit", "label": "b"}],
           "images": {"path": "sample", "count": 2}, "metrics": ["mad"], "batch_size": 2, "figures": []}
    out = tmp_path / "out"
    compare(run_file(run), out=out, report=False)
    user = out / "results.parquet" / "_mine.txt"  # ("_": a name Parquet readers skip)
    user.write_text("a user's file")
    fewer = compare(run_file(run, models=[{"model": "toy:vit", "label": "a"}], file="r2.yaml"), out=out, report=False)
    assert not (out / "results.parquet" / "model=b").exists() and user.read_text() == "a user's file"
    assert pd.read_parquet(out / "results.parquet")["model"].astype(str).unique().tolist() == ["a"]
    assert fewer.results.models == ["a"]
    # a part file at a name no probekit run recorded is never replaced
    rj = json.loads((out / "run.json").read_text())
    rj["owned"] = [n for n in rj["owned"] if "model=a/" not in n]
    rj["manifest"] = {k: v for k, v in rj["manifest"].items() if "model=a/" not in k}
    (out / "run.json").write_text(json.dumps(rj))
    with pytest.raises(RunDirError, match=r"model=a/metric=mad/part-00000.parquet was not written by probekit"):
        compare(run_file(run), out=out, report=False)


def test_scan_of_a_folder_without_index_lists_its_hive_parts(tmp_path):
    table = _table()
    root = _written(tmp_path, table)
    (root / INDEX).unlink()
    scan = ResultsScan(root)
    assert sorted(scan.models) == sorted(MODELS)
    pd.testing.assert_frame_equal(_canon(scan.to_results().table), _canon(table))


def test_joined_parts_and_cached_parts_are_streamed_into_files_equal_to_the_in_memory_ones(tmp_path):
    from probekit.runs.parts import PartStore

    table = _table(seed=5)
    one = table[(table["model"] == "dino%v2") & (table["metric"] == "mad")].reset_index(drop=True)
    store = PartStore(tmp_path / "parts")
    for i, rows in enumerate(np.array_split(np.arange(len(one)), 3)):  # three shards, as the Ray engine seals them
        store.write(f"s{i}", Results(one.iloc[rows].reset_index(drop=True), meta={"model": "dino%v2"}))
    store.write_joined("whole", ["s0", "s1", "s2"], Results(one.iloc[:0], meta={"model": "dino%v2", "seconds": 1.5}))
    whole = store.read("whole")
    pd.testing.assert_frame_equal(whole.table, Results(one).table, check_exact=True)
    assert whole.meta == {"model": "dino%v2", "seconds": 1.5}
    lazy = store.read_lazy("whole")  # rows left in the file: copied batch by batch into a results folder
    assert lazy.source is not None and lazy.models == ["dino%v2"]
    w = DatasetWriter(tmp_path / "results.parquet")
    assert [p.rows for p in w.write_file(lazy.source.path, "renamed", batch_rows=5)] == [len(one)]
    w.commit()
    back = Results.read_parquet(tmp_path / "results.parquet").table
    pd.testing.assert_frame_equal(back, Results(one.assign(model="renamed")).table, check_exact=True)


def test_a_large_part_is_copied_into_parts_of_bounded_rows_that_read_as_the_whole(tmp_path):
    """write_file splits a model's rows for a metric into parts of about ``part_rows`` (at batch
    boundaries), so a summary or a contrast never reads more than that at once; an image's heads may
    then span two parts, and per-image means still equal the in-memory ones."""
    from probekit.runs.parts import PartStore

    table = _table(seed=7, images=9)
    one = table[table["model"] == "vit/b 16"].reset_index(drop=True)  # both metrics, as a cached part holds them
    PartStore(tmp_path / "parts").write("whole", Results(one, meta={"model": "vit/b 16"}))
    w = DatasetWriter(tmp_path / "results.parquet")
    infos = w.write_file(tmp_path / "parts" / "whole.parquet", "vit/b 16", batch_rows=5, part_rows=12)
    w.commit()
    mad_rows = int((one["metric"] == "mad").sum())  # 9 images x 3 layers x 2 heads = 54: 15 + 15 + 15 + 9
    assert [(p.metric, p.rows) for p in infos if p.metric == "mad"] == [("mad", 15)] * 3 + [("mad", 9)]
    assert infos[1].path == "model=vit%2Fb%2016/metric=mad/part-00000-00001.parquet" and sum(
        p.rows for p in infos if p.metric == "mad") == mad_rows
    scan = Results.scan(tmp_path / "results.parquet")
    pd.testing.assert_frame_equal(_canon(scan.to_results().table), _canon(one))
    for metric in ("mad", "entropy"):  # 15-row parts cut images' 6 rows of mad apart
        pd.testing.assert_series_equal(scan.per_image_layer(metric), per_image_layer(one, metric),
                                       check_names=False, rtol=1e-15, atol=0)
    pd.testing.assert_frame_equal(scan.summary().astype({"model": str, "metric": str}),
                                  summarize(one).astype({"model": str, "metric": str}), rtol=1e-12, atol=1e-12)


def test_the_length_of_results_on_disk_is_counted_without_reading_their_rows(tmp_path):
    """len() (and so truth, ``part or other``) of a lazy part or dataset counts rows from the index or the
    files' footers and leaves the rows on disk (reading them kept every Ray shard's rows in the driver)."""
    from probekit.runs.parts import PartStore

    table = _table(seed=2)
    store = PartStore(tmp_path / "parts")
    store.write("one", Results(table, meta={"model": "x"}))
    lazy = store.read_lazy("one")
    assert len(lazy) == len(table) and lazy and lazy.source is not None  # still on disk
    root = _written(tmp_path, table, shards=2)
    (root / INDEX).unlink()  # a folder without index: its parts' counts are unknown (-1) until counted
    scan = Results.scan(root)
    assert len(Results._lazy(scan)) == len(table)
    layer0 = scan.filter(models=["dino%v2"], layers=[0])
    want = int(((table["model"] == "dino%v2") & (table["layer"] == 0)).sum())
    assert len(Results._lazy(layer0)) == want == len(layer0.to_results().table)
