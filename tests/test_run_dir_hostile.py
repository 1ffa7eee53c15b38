"""A run directory meets a careless user and an adversary (issue 19, items 1 and 11, and "done when").

- ``--out`` (or a run file's ``out:``) on a folder of the user's that is not a probekit run is
  refused with one line, and every file there stays byte-identical; a run, ``probekit plot`` and
  ``probekit report`` replace or remove only files that a probekit run wrote there.
- Every kind of file a run directory holds (parts: parquet, npz, seal; the Ray engine's shard
  parts with metric state; the explorer's arrays; ``arrays.npz``; ``run.json``; figure stamps) is
  planted with hostile content: a pickle whose unpickling would create a marker file, object
  arrays, JSON of odd types, a seal recomputed to match. Nothing runs (no marker), and the run
  refuses with one line or recomputes.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from probekit.api import compare
from probekit.errors import ConfigError, RunDirError
from probekit._io.fileid import file_digest
from probekit.runs.rundir import load_run_dir, read_record
from probekit.views.outputs import redraw

pytestmark = pytest.mark.usefixtures("toy_backend")

RUN = {"name": "hostile", "models": [{"model": "toy:vit", "label": "toy"}], "images": {"path": "sample", "count": 2},
       "metrics": ["mad"], "batch_size": 2, "figures": [], "report": {"showcase": 0}}


class _Planted:
    """Unpickling this creates the marker file (no shell needed)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _users_folder(root: Path) -> Path:
    d = root / "mine"
    (d / "figures").mkdir(parents=True)
    (d / "figures" / "fig1.png").write_bytes(b"\x89PNG my figure")
    (d / "figures" / "depth_mad.png").write_bytes(b"\x89PNG mine too, named like probekit's")
    (d / "notes.md").write_text("my notes\n")
    (d / "summary.csv").write_text("my,summary\n1,2\n")
    (d / "results.parquet").write_bytes(b"my own parquet")
    (d / "arrays.npz").write_bytes(b"my arrays")
    (d / "report.html").write_text("<p>my report</p>")
    return d


# -- item 1: a folder that is not a probekit run ------------------------------------------------------
@pytest.mark.parametrize("how", ["argument", "run file out:", "cli --out"])
def test_out_on_a_users_folder_is_refused_in_one_line_and_every_file_stays(tmp_path, how, run_cli, run_file):
    d = _users_folder(tmp_path)
    before = _snapshot(d)
    if how == "cli --out":
        out = run_cli("compare", run_file(RUN, figures=["depth"]), "--out", d)
        assert out.exit_code == 1
        first = out.stderr.strip().splitlines()[0]
        assert first.startswith("Error:") and "not a probekit run" in first and "Traceback" not in out.output
    else:
        with pytest.raises(RunDirError) as err:
            if how == "argument":
                compare(run_file(RUN, figures=["depth"]), out=d)
            else:
                compare(run_file(RUN, figures=["depth"], out=str(d)))
        msg = str(err.value)
        assert "\n" not in msg and "not a probekit run" in msg
        assert "empty" in msg and "previous probekit run directory" in msg
    assert _snapshot(d) == before  # nothing deleted, overwritten or added (no lock, no parts/)


def test_a_folder_with_a_run_json_that_is_not_probekits_is_refused(tmp_path, run_file):
    d = tmp_path / "x"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"name": "my experiment", "lr": 0.1}))
    (d / "data.csv").write_text("a\n1\n")
    before = _snapshot(d)
    with pytest.raises(RunDirError, match="not a probekit run"):
        compare(run_file(RUN), out=d)
    assert _snapshot(d) == before


def test_an_empty_existing_folder_and_a_new_one_are_fine(tmp_path, run_file):
    (tmp_path / "empty").mkdir()
    assert compare(run_file(RUN), out=tmp_path / "empty").status == "complete"
    assert compare(run_file(RUN), out=tmp_path / "new" / "deeper").status == "complete"


def test_a_rerun_replaces_only_files_a_probekit_run_wrote(tmp_path, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN, figures=["depth"], metrics=["mad", "cls_map"]), out=out)
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["depth_mad.png", "depth_mad.svg"]
    (out / "notes.md").write_text("what I saw\n")
    (out / "figures" / "mine.png").write_bytes(b"my figure")
    (out / "figures" / "mine-notes.txt").write_text("mine")
    theirs = {k: v for k, v in _snapshot(out).items() if "mine" in k or k == "notes.md"}
    again = compare(run_file(RUN, figures=["heatmap"]), out=out)  # no map metric: arrays.npz goes
    assert again.status == "complete"
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "heatmap_mad.png", "heatmap_mad.svg", "mine-notes.txt", "mine.png"]  # depth_*: the earlier run's
    assert not (out / "arrays.npz").exists()
    assert {k: v for k, v in _snapshot(out).items() if k in theirs} == theirs
    rec = read_record(out)
    assert "figures/mine.png" not in rec.manifest and "figures/mine.png" not in rec.owned


def test_a_run_refuses_to_draw_over_a_users_file_and_loses_no_number(tmp_path, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN), out=out)
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / "depth_mad.png").write_bytes(b"mine")
    again = compare(run_file(RUN, figures=["depth"]), out=out)
    assert "figures/depth_mad.png" in again.figure_error and "not written by probekit" in again.figure_error
    assert (out / "figures" / "depth_mad.png").read_bytes() == b"mine"
    assert not (out / "figures" / "depth_mad.svg").exists()  # all figures or none
    assert len(load_run_dir(out).table) == len(again.results.table)


def test_plot_and_report_replace_only_files_the_manifest_lists(tmp_path, run_cli, run_file):
    from probekit.views.report import rebuild

    out = tmp_path / "out"
    compare(run_file(RUN, figures=["depth"]), out=out)
    (out / "figures" / "heatmap_mad.png").write_bytes(b"my heatmap")
    (out / "figures" / "mine.png").write_bytes(b"mine")
    with pytest.raises(RunDirError, match=r"heatmap_mad.png was not written by probekit"):
        redraw(out, kinds=["heatmap"])
    res = run_cli("plot", out, "--kind", "heatmap")
    assert res.exit_code == 1 and "not written by probekit" in res.stderr.strip().splitlines()[0]
    assert (out / "figures" / "heatmap_mad.png").read_bytes() == b"my heatmap"
    assert not (out / "figures" / "heatmap_mad.svg").exists()
    (out / "figures" / "heatmap_mad.png").unlink()
    old_depth = (out / "figures" / "depth_mad.png").read_bytes()
    paths = redraw(out, kinds=["depth", "heatmap"])
    assert sorted(p.name for p in paths) == ["depth_mad.png", "depth_mad.svg", "heatmap_mad.png", "heatmap_mad.svg"]
    assert (out / "figures" / "depth_mad.png").read_bytes() == old_depth
    assert (out / "figures" / "mine.png").read_bytes() == b"mine"
    (out / "contrasts.csv").unlink()  # listed, so rebuilding refuses it as a changed run ...
    with pytest.raises(RunDirError, match="contrasts.csv is missing"):
        rebuild(out)
    compare(run_file(RUN, figures=["depth"]), out=out)  # ... and a rerun writes it again
    assert rebuild(out) == out / "report.html"
    assert (out / "figures" / "mine.png").read_bytes() == b"mine"
    read_record(out)


def test_an_interrupted_run_resumes_and_replaces_what_it_wrote(tmp_path, monkeypatch, run_file):
    import probekit.runs.rundir

    out = tmp_path / "out"
    real = probekit.runs.rundir.write_text_atomic

    def ctrl_c_at_summary(path, text):
        if Path(path).name == "summary.csv":
            raise KeyboardInterrupt  # after results.parquet, before summary.csv
        return real(path, text)

    monkeypatch.setattr(probekit.runs.rundir, "write_text_atomic", ctrl_c_at_summary)
    with pytest.raises(KeyboardInterrupt):
        compare(run_file(RUN), out=out)
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "interrupted" and "results.parquet/model=toy/metric=mad/part-00000.parquet" in rec["owned"]
    monkeypatch.setattr(probekit.runs.rundir, "write_text_atomic", real)
    assert compare(run_file(RUN), out=out).status == "complete"


def test_a_run_directory_of_an_earlier_probekit_without_an_owned_list_still_reruns(tmp_path, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN, figures=["depth"]), out=out)
    rec = json.loads((out / "run.json").read_text())
    del rec["owned"]
    (out / "run.json").write_text(json.dumps(rec))
    again = compare(run_file(RUN, figures=["heatmap"]), out=out)
    assert again.status == "complete" and not (out / "figures" / "depth_mad.png").exists()


# -- done when: hostile files in every place a run directory holds ----------------------------------
def _reseal(parts: Path, key: str) -> None:
    """A seal recomputed to match whatever the part's files now are (anyone can)."""
    files = {p.name: file_digest(p) for p in (parts / f"{key}.parquet", parts / f"{key}.npz") if p.exists()}
    (parts / f"{key}.seal.json").write_text(json.dumps({"format": 2, "files": files}))


def _object_npz(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{"__keys__": np.frombuffer(b'["toy/cls_map"]', np.uint8),
                       "a0": np.array([_Planted(marker)], dtype=object)})


def _extension_parquet(path: Path, marker: Path) -> None:
    """A parquet file whose column claims pyarrow's old pickled extension type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickle.dumps(_Planted(marker))}
    df = pd.DataFrame({"model": ["toy"], "image": ["x"], "layer": [0], "head": [0], "metric": ["mad"], "value": [1.0]})
    tbl = pa.Table.from_pandas(df, preserve_index=False)
    fields = [f.with_metadata(meta) if f.name == "value" else f for f in tbl.schema]
    tbl = tbl.cast(pa.schema(fields, metadata={b"probekit": json.dumps({"model": ["odd"], "images": 5}).encode()}))
    pq.write_table(tbl, path)


@pytest.mark.parametrize("plant", ["npz object arrays", "parquet extension pickle", "seal of odd types",
                                   "meta of odd types", "parquet that is a pickle"])
def test_planted_parts_run_nothing_and_are_recomputed(tmp_path, plant, run_file):
    out = tmp_path / "out"
    run = run_file(RUN, metrics=["mad", "cls_map"])
    first = compare(run, out=out)
    marker = tmp_path / "PWNED"
    parts = out / "parts"
    keys = sorted(p.name.removesuffix(".seal.json") for p in parts.glob("*.seal.json"))
    assert len(keys) == 2
    for key in keys:
        pq_, npz = parts / f"{key}.parquet", parts / f"{key}.npz"
        if plant == "npz object arrays":
            _object_npz(npz, marker)
        elif plant == "parquet extension pickle":
            _extension_parquet(pq_, marker)
        elif plant == "parquet that is a pickle":
            pq_.write_bytes(pickle.dumps(_Planted(marker)))
        elif plant == "meta of odd types":
            import pyarrow.parquet as pq

            tbl = pq.read_table(pq_)
            odd = {"model": {"x": 1}, "images": [1, 2], "metrics": "mad", "layout": 7, "skipped": {"a": None}}
            pq.write_table(tbl.replace_schema_metadata({**tbl.schema.metadata, b"probekit": json.dumps(odd).encode()}), pq_)
        if plant == "seal of odd types":
            (parts / f"{key}.seal.json").write_text(json.dumps({"format": [2], "files": [["x", 1]]}))
        else:
            _reseal(parts, key)
    again = compare(run, out=out)
    assert not marker.exists()
    assert again.status == "complete" and again.cached == []  # recomputed, not served
    pd.testing.assert_frame_equal(again.results.table, first.results.table)
    np.testing.assert_array_equal(again.results.arrays["toy/cls_map"], first.results.arrays["toy/cls_map"])


def test_a_planted_arrays_npz_and_run_json_are_refused_in_one_line(tmp_path, run_cli, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN, metrics=["mad", "cls_map"]), out=out)
    marker = tmp_path / "PWNED"
    _object_npz(out / "arrays.npz", marker)
    rec = json.loads((out / "run.json").read_text())
    rec["manifest"]["arrays.npz"] = file_digest(out / "arrays.npz")  # a manifest recomputed to match
    (out / "run.json").write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match="arrays.npz") as err:
        load_run_dir(out)
    assert "\n" not in str(err.value)
    res = run_cli("plot", out)
    first = res.stderr.strip().splitlines()[0]
    assert res.exit_code == 1 and first.startswith("Error:") and "arrays.npz" in first
    assert not marker.exists()
    for odd in ([1, 2], "complete", {"status": "complete", "run_id": "x", "manifest": [["../../etc/passwd", "0"]]},
                {"status": ["complete"], "run_id": {"a": 1}, "manifest": {}}, None):
        (out / "run.json").write_text(json.dumps(odd))
        with pytest.raises(RunDirError):
            load_run_dir(out)
        res = run_cli("plot", out)
        assert res.exit_code == 1 and res.stderr.strip().startswith("Error:"), res.output
    assert not marker.exists()


def test_a_pickle_as_run_json_is_never_unpickled_and_the_folder_is_refused(tmp_path, run_file):
    out = tmp_path / "out"
    compare(run_file(RUN), out=out)
    marker = tmp_path / "PWNED"
    (out / "run.json").write_bytes(pickle.dumps(_Planted(marker)))
    before = _snapshot(out)
    with pytest.raises(RunDirError, match="not a probekit run"):
        compare(run_file(RUN), out=out)
    with pytest.raises(RunDirError):
        load_run_dir(out)
    assert not marker.exists() and _snapshot(out) == before


@pytest.mark.parametrize("plant", ["object arrays", "plain arrays of other names and shapes"])
def test_planted_explorer_arrays_are_captured_again(tmp_path, plant, run_file):
    out = tmp_path / "out"
    run = run_file(RUN, report={"showcase": 1})
    compare(run, out=out)
    (explorer,) = (out / "parts" / "explorer").glob("*.npz")
    from probekit.runs.explorer import load

    good = load(explorer)
    marker = tmp_path / "PWNED"
    with open(explorer, "wb") as f:
        if plant == "object arrays":
            np.savez(f, attn=np.array([_Planted(marker)], dtype=object), names=np.array(["a"]))
        else:
            np.savez(f, attn=np.zeros((1, 2), np.float64), names=np.array([1, 2]), grid=np.array("x"))
    again = compare(run, out=out)
    assert not marker.exists()
    assert read_record(out).models[0].explorer_s is not None  # the model was loaded to capture them again
    back = load(explorer)
    assert sorted(back) == sorted(good) and all(np.array_equal(back[k], good[k]) for k in good)
    assert again.status == "complete" and read_record(out).report_error is None
    assert '"explorer": null' not in again.report.read_text()


def test_planted_figure_stamps_of_odd_types_redraw_the_figures(tmp_path, run_file):
    out = tmp_path / "out"
    run = run_file(RUN, figures=["depth"])
    compare(run, out=out)
    marker = tmp_path / "PWNED"
    for odd in (json.dumps([1, 2]), json.dumps({"depth_mad": {"x": 1}}), pickle.dumps(_Planted(marker)).hex()):
        (out / "parts" / "figure-stamps.json").write_text(odd)
        again = compare(run, out=out)
        assert again.figure_error is None and [p.name for p in again.figures] == ["depth_mad.png", "depth_mad.svg"]
    assert not marker.exists()


# -- item 11: the Ray engine's shard parts ------------------------------------------------------------
def _ray_plan(tmp_path, out: Path):
    from probekit.runs.config import RunConfig, check_run
    from probekit.runs.engines.ray import _plan
    from probekit.runs.parts import PartStore

    cfg = RunConfig.model_validate({"name": "r", "models": [{"model": "toy:vit", "label": "toy"}],
                                    "images": {"path": "sample", "count": 4}, "metrics": ["mad", "cka"],
                                    "batch_size": 4, "figures": []}).resolve(out=str(out))
    run = check_run(cfg)
    store = PartStore(out / "parts")
    fp = run.images.fingerprint()
    return run, store, fp, (lambda: _plan(run, store, fp, [(0, 4)]))


def test_a_ray_shard_part_stores_metric_state_as_plain_json_that_merges_back(tmp_path):
    import torch

    from probekit.runs.shards import states_of as _states
    from probekit.engine.probe import build_metrics, probe
    from probekit.results import Results

    run, store, fp, plan = _ray_plan(tmp_path, tmp_path / "out")
    (job,) = plan()
    assert job.todo == [0] and job.have == {}
    import probekit as pk

    pm = pk.load("toy:vit")
    mets = build_metrics([("cka", {})])
    res = probe(pm, torch.randn(4, 3, 32, 32), mets, batch_size=4, label="toy")
    from probekit.runs.engines.ray import _shard_results

    job.chunks[0] = {"probe_s": 0.1, "table": res.table.copy(), "kept": [0, 1, 2, 3], "arrays": {}, "meta": res.meta,
                     "states": {mets[0].label: mets[0].state_dict()}}
    job.missing = [m for m in run.metrics if m.name == "cka"]
    (part,) = _shard_results(run, job, 0, 4, [0]).values()
    blob = json.dumps(part.meta["state"])
    assert "tensor" in blob and "gASV" not in blob  # base64 of numbers, no pickle stream
    store.write(job.shard_keys[0][mets[0].label], part)
    back = store.read(job.shard_keys[0][mets[0].label])
    (st,) = _states(back)
    merged = build_metrics([("cka", {})])[0].merge(st)
    np.testing.assert_array_equal(merged.dataset_result(), mets[0].dataset_result())
    assert isinstance(back, Results)


@pytest.mark.parametrize("state", ["old pickle", "odd json", "object tensor"])
def test_a_planted_ray_shard_part_runs_nothing_and_is_computed_again(tmp_path, state):
    import base64

    from types import SimpleNamespace

    from probekit.results import Results
    from probekit.runs.shards import whole_part

    marker = tmp_path / "PWNED"
    out = tmp_path / "out"
    run, store, fp, plan = _ray_plan(tmp_path, out)
    (job,) = plan()
    planted = {"old pickle": base64.b64encode(pickle.dumps([_Planted(marker)])).decode(),
               "odd json": [{"name": "cka", "options": {}, "state": {"xy": {"__reduce__": ["os.system", "x"]}}}],
               "object tensor": [{"name": "cka", "options": {}, "state": {
                   "xy": {"tensor": {"dtype": "object", "shape": [1], "data": base64.b64encode(
                       pickle.dumps(_Planted(marker))).decode()}}}}]}[state]
    table = pd.DataFrame({"model": ["toy"] * 2, "image": ["a", "b"], "layer": [0, 0], "head": [0, 0],
                          "metric": ["mad", "mad"], "value": [1.0, 2.0]})
    for m in run.metrics:  # every metric's shard part planted, its key computed as the engine does
        meta = {"model": "toy", "spec": "toy:vit", "images": {"skipped": []}, "state": planted}  # all else plausible
        store.write(job.shard_keys[0][m.label], Results(table.assign(metric=m.label), meta=meta))
    (job,) = plan()
    admitted = dict(job.have)
    for m in job.missing:
        try:  # what the engine does with the shards it admits (all shards cached: the whole-set part)
            job.have = {0: {mm.label: store.read(job.shard_keys[0][mm.label]) for mm in job.missing}}
            record = SimpleNamespace(images=SimpleNamespace(names=run.images.names, fingerprint=fp))
            whole_part(run, "toy", [job.have[0][m.label]], m, record, "ray", [])
        except Exception:
            pass
    assert not marker.exists()
    assert job.todo == [0] and admitted == {}  # refused: the shard is computed again


def test_state_json_refuses_everything_but_numbers_strings_and_containers():
    import torch

    from probekit.metric.state import state_from_json, state_to_json

    state = {"name": "cka", "options": {"bins": (1, 2.5)}, "state": {
        "xy": torch.randn(3, 3, dtype=torch.float64), "layers": [0, 1], "n": 3, "none": None,
        "values": {0: [torch.randn(2, 2), torch.ones(2, dtype=torch.bfloat16)], 1: []}, "a": np.arange(3)}}
    back = state_from_json(json.loads(json.dumps(state_to_json(state))))
    assert back["options"] == {"bins": (1, 2.5)} and list(back["state"]["values"]) == [0, 1]
    assert torch.equal(back["state"]["xy"], state["state"]["xy"])
    assert back["state"]["values"][0][1].dtype == torch.bfloat16
    np.testing.assert_array_equal(back["state"]["a"], np.arange(3))
    with pytest.raises(TypeError):
        state_to_json({"f": lambda: 0})
    for bad in ({"x": 1}, {"tensor": {"dtype": "object", "shape": [1], "data": ""}},
                {"tensor": {"dtype": "float32", "shape": [4], "data": "AAAA"}},
                {"dict": [[{"tuple": [1]}, 1]]}, {"ndarray": {"dtype": "float32", "shape": [-1], "data": ""}}):
        with pytest.raises(ConfigError):
            state_from_json(bad)
