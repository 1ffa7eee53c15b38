"""Image sources: class folders, manifests, WebDataset shards, ``datasets`` data; sampling; labels.

Each labelled source must give the same per-image values as the same files passed as paths,
with a ``label`` column that round-trips parquet and CSV; listing 50,000 images opens none.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import probekit as pk
from probekit.api import compare
from probekit.errors import ConfigError, ImageError
from probekit.results import Results
from probekit.inputs.sources import ClassFolder, HFDataset, Manifest, WebDataset, sample_indices

pytestmark = pytest.mark.usefixtures("toy_backend")

CLASSES = {"cat": ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"], "space": ["hubble_deep_field.jpg", "rocket.jpg",
                                                                          "camera.jpg"]}


@pytest.fixture
def pm():
    """One toy model per test: the reference and the source runs must see the same weights."""
    return pk.load("toy:vit")


@pytest.fixture
def class_tree(tmp_path) -> Path:
    samples = {p.name: p for p in pk.sample_images()}
    root = tmp_path / "classes"
    for c, files in CLASSES.items():
        (root / c).mkdir(parents=True)
        for f in files:
            shutil.copy(samples[f], root / c / f)
    return root


def _per_image(res: Results) -> pd.Series:
    t = res.table
    return t.set_index(["image", "metric", "layer", "head"])["value"].sort_index()


def _reference(pm, root: Path, names: list[str]) -> pd.Series:
    """The values of the same files probed as plain paths (the engine's plain path)."""
    res = pk.probe(pm, [root / n for n in names], ["mad", "entropy"], batch_size=4)
    t = res.table.copy()
    t["image"] = t["image"].astype(str).map(dict(zip(map(str, [root / n for n in names]), names)))
    return _per_image(Results(t))


def test_class_folder_labels_and_values_equal_plain_paths(pm, class_tree):
    src = ClassFolder(class_tree)
    res = pk.probe(pm, src, ["mad", "entropy"], batch_size=4)
    names = [f"{c}/{f}" for c in CLASSES for f in sorted(CLASSES[c])]
    assert list(dict.fromkeys(res.table["image"].astype(str))) == names
    assert dict(zip(res.table["image"].astype(str), res.table["label"])) == {n: n.split("/")[0] for n in names}
    pd.testing.assert_series_equal(_per_image(res), _reference(pm, class_tree, names), rtol=0, atol=1e-6)
    by_label = res.summary(by=("model", "metric", "label", "layer", "head"))
    assert set(by_label["label"]) == {"cat", "space"} and (by_label["n"] == 3).all()


def test_label_column_round_trips_parquet_and_csv(pm, class_tree, tmp_path):
    res = pk.probe(pm, ClassFolder(class_tree), ["mad"], batch_size=6)
    for back in (Results.read_parquet(res.to_parquet(tmp_path / "r.parquet")),
                 Results.read_csv(res.to_csv(tmp_path / "r.csv"))):
        assert back.table["label"].astype(str).tolist() == res.table["label"].astype(str).tolist()
        np.testing.assert_array_equal(back.table["value"].to_numpy(), res.table["value"].to_numpy())


def test_manifest_csv_and_parquet_with_labels_and_groups(pm, class_tree, tmp_path):
    rows = [{"path": f"classes/{c}/{f}", "species": c, "group": "g1" if i % 2 else "g0"}
            for c in CLASSES for i, f in enumerate(CLASSES[c])]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    for file in ("m.csv", "m.parquet"):
        s = Manifest(tmp_path / file, label_column="species").image_set()
        assert s.names == [r["path"] for r in rows]  # manifest order, names as written
        assert s.labels == [r["species"] for r in rows] and s.groups == [r["group"] for r in rows]
    res = pk.probe(pm, Manifest(tmp_path / "m.csv", label_column="species"), ["mad", "entropy"], batch_size=4)
    names = [r["path"] for r in rows]
    pd.testing.assert_series_equal(_per_image(res), _reference(pm, tmp_path, names), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="no column 'kind'.*path, species, group"):
        Manifest(tmp_path / "m.csv", label_column="kind").image_set()
    pd.DataFrame([{"path": "nowhere.jpg"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ImageError, match="1 path.*nowhere.jpg.*relative to the manifest"):
        Manifest(tmp_path / "bad.csv").image_set()


def _write_shards(class_tree: Path, out: Path) -> list[str]:
    out.mkdir()
    names = []
    files = [(c, f) for c in CLASSES for f in CLASSES[c]]
    for s in range(2):
        with tarfile.open(out / f"val-{s:03d}.tar", "w") as tar:
            for i, (c, f) in enumerate(files[s * 3:(s + 1) * 3]):
                key = f"{s * 3 + i:06d}"
                tar.add(class_tree / c / f, arcname=f"{key}.jpg")
                data = c.encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                names.append((f"val-{s:03d}.tar/{key}", c, f"{c}/{f}"))
    return names


def test_webdataset_shards_brace_notation(pm, class_tree, tmp_path):
    expected = _write_shards(class_tree, tmp_path / "shards")
    src = WebDataset(str(tmp_path / "shards" / "val-{000..001}.tar"))
    s = src.image_set()
    assert s.names == [n for n, _, _ in expected] and s.labels == [c for _, c, _ in expected]
    res = pk.probe(pm, src, ["mad", "entropy"], batch_size=4)
    ref = _reference(pm, class_tree, [f for _, _, f in expected])
    got = _per_image(res).rename(index=dict((n, f) for n, _, f in expected), level="image").sort_index()
    pd.testing.assert_series_equal(got, ref, rtol=0, atol=1e-6)


def test_hf_parquet_and_save_to_disk(pm, class_tree, tmp_path):
    datasets = pytest.importorskip("datasets")  # the [hf] extra; CI installs it with [test]
    files = [(c, f) for c in CLASSES for f in CLASSES[c]]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict({"image": [str(class_tree / c / f) for c, f in files],
                                     "label": [list(CLASSES).index(c) for c, _ in files]}, features=feats)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "val.parquet"))
    ref = _reference(pm, class_tree, [f"{c}/{f}" for c, f in files])
    for path in (tmp_path / "saved", tmp_path / "val.parquet"):
        src = HFDataset(path, label_column="label")
        s = src.image_set()
        assert s.labels == [c for c, _ in files]  # ClassLabel ints named by the dataset's class names
        res = pk.probe(pm, src, ["mad", "entropy"], batch_size=4)
        got = _per_image(res).rename(index=dict(zip(s.names, [f"{c}/{f}" for c, f in files])), level="image")
        pd.testing.assert_series_equal(got.sort_index(), ref, rtol=0, atol=1e-6)


def test_stratified_sampling_keeps_label_shares_and_is_seeded():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    idx = sample_indices(100, 20, seed=3, labels=labels, stratify=True)
    assert Counter(labels[i] for i in idx) == {"a": 12, "b": 6, "c": 2}
    assert idx == sample_indices(100, 20, seed=3, labels=labels, stratify=True) == sorted(idx)
    assert idx != sample_indices(100, 20, seed=4, labels=labels, stratify=True)
    plain = sample_indices(100, 20, seed=3)
    assert len(set(plain)) == 20 and plain == sorted(plain)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    """50,000 empty .jpg files in 100 class folders, with a manifest of them."""
    root = tmp_path_factory.mktemp("big")
    rows = []
    for c in range(100):
        d = root / f"n{c:08d}"
        d.mkdir()
        for i in range(500):
            name = f"n{c:08d}/ILSVRC2012_val_{c * 500 + i:08d}.JPEG"
            (root / name).touch()
            rows.append((name, f"n{c:08d}"))
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classes", "manifest"])
def test_listing_50k_images_opens_none(big_tree, monkeypatch, kind):
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real(*a, **k))
    src = ClassFolder(big_tree, count=1000, stratify=True, seed=0) if kind == "classes" else \
        Manifest(big_tree / "manifest.csv", count=1000, stratify=True, seed=0)
    s = src.image_set()
    assert opened == []  # the files are empty: opening any would also have failed
    assert len(s) == 1000 and Counter(s.labels) == {f"n{c:08d}": 10 for c in range(100)}
    assert s.origin == {**s.origin, "listed": 50_000, "count": 1000, "stratify": True}


def test_unreadable_image_in_a_lazy_source_is_skipped_by_name_or_stops_under_strict(pm, class_tree):
    (class_tree / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    res = pk.probe(pm, ClassFolder(class_tree), ["mad"], batch_size=4)
    assert "cat/broken.jpg" not in set(res.table["image"].astype(str))
    assert res.table["image"].nunique() == 6
    assert [n for n, _ in res.meta["images"]["skipped"]] == ["cat/broken.jpg"]
    with pytest.raises(ImageError, match="broken.jpg"):
        pk.probe(pm, ClassFolder(class_tree), ["mad"], batch_size=4, strict=True)


def test_run_file_source_records_labels_and_sampling_in_run_json(class_tree, tmp_path, run_file):
    def labelled(kind: str):
        images = {"kind": kind, "path": str(class_tree), "count": 4, "seed": 2, "stratify": True}
        return run_file(name="labelled", images=images, batch_size=3, figures=["labels"])

    cmp = compare(labelled("classes"), out=tmp_path / "out")
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert Counter(rec["images"]["labels"]) == {"cat": 2, "space": 2}
    assert rec["images"]["source"]["kind"] == "classes" and rec["images"]["source"]["seed"] == 2
    back = Results.read_parquet(tmp_path / "out" / "results.parquet")
    assert dict(zip(back.table["image"].astype(str), back.table["label"])) == dict(
        zip(rec["images"]["names"], rec["images"]["labels"]))
    assert cmp.results.table["label"].notna().all()
    assert sorted(p.name for p in cmp.figures) == ["labels_mad.png", "labels_mad.svg"]  # a line per label
    with pytest.raises(ConfigError, match="stratify needs labels"):
        compare(labelled("files"), out=tmp_path / "out2")


# -- issue 19: content identity, empty cells, odd names, malformed manifests and shards ----------
def _ppm(seed: int, size: int = 32) -> bytes:
    """An uncompressed image: same size in bytes for any pixels, so a rewrite can keep the size."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PPM")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


def _rewrite_keeping_stamp(path: Path, write) -> None:
    """Rewrite ``path`` in place (same inode, same size) and restore its mtime, as ``cp -p`` or ``rsync -t``."""
    st = path.stat()
    write(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _images_as(kind: str, root: Path, images: dict[str, bytes]):
    """A source of ``kind`` over ``images`` ({name: bytes}) and a function that rewrites one image in place."""
    datasets = pytest.importorskip("datasets") if kind in ("hf-disk", "hf-parquet") else None
    if kind in ("files", "classes", "manifest"):
        folder = root / "cls"
        folder.mkdir(parents=True)
        for n, data in images.items():
            (folder / n).write_bytes(data)
        pd.DataFrame({"path": [f"cls/{n}" for n in images]}).to_csv(root / "m.csv", index=False)
        src = {"files": folder, "classes": ClassFolder(root), "manifest": Manifest(root / "m.csv")}[kind]
        return src, lambda n, data: _rewrite_keeping_stamp(folder / n, lambda p: p.write_bytes(data))
    if kind == "webdataset":
        shard = root / "s-000.tar"
        _tar(shard, {f"{n.split('.')[0]}.ppm": d for n, d in images.items()})

        def rewrite(n, data):
            new = dict(images, **{n: data})
            _rewrite_keeping_stamp(shard, lambda p: _tar(p, {f"{k.split('.')[0]}.ppm": d for k, d in new.items()}))
        return WebDataset(shard), rewrite
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(imgs):
        return pa.table({"image": [{"bytes": d, "path": None} for d in imgs.values()], "label": list(range(len(imgs)))})
    if kind == "hf-parquet":
        file = root / "val.parquet"
        pq.write_table(table(images), file, compression="none", write_statistics=False)

        def rewrite(n, data):
            new = table(dict(images, **{n: data}))
            _rewrite_keeping_stamp(file, lambda p: pq.write_table(new, p, compression="none", write_statistics=False))
        return HFDataset(file), rewrite
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(table(images).to_pydict(), features=feats).save_to_disk(str(root / "saved"))
    (arrow,) = (root / "saved").glob("*.arrow")

    def rewrite(n, data):
        other = root / "other"
        datasets.Dataset.from_dict(table(dict(images, **{n: data})).to_pydict(), features=feats).save_to_disk(str(other))
        (new,) = other.glob("*.arrow")
        _rewrite_keeping_stamp(arrow, lambda p: p.write_bytes(new.read_bytes()))
    return HFDataset(root / "saved"), rewrite


@pytest.mark.parametrize("kind", ["files", "classes", "manifest", "webdataset", "hf-parquet", "hf-disk"])
def test_a_same_size_same_mtime_rewrite_of_one_image_changes_the_fingerprint(tmp_path, kind):
    # issue 19.2: tar members and dataset rows were identified by their container's size and mtime
    images = {f"{i:06d}.ppm": _ppm(i) for i in range(3)}
    src, rewrite = _images_as(kind, tmp_path, images)
    listed = pk.resolve_images(src)
    before = listed.fingerprint()
    assert pk.resolve_images(src).fingerprint() == before  # the same bytes: the same identity
    rewrite("000001.ppm", _ppm(99))  # one image's pixels; every byte count and time kept
    assert pk.resolve_images(src).fingerprint() != before


def test_a_shard_rewritten_in_place_is_recomputed_not_served_from_the_cache(tmp_path, run_file):
    images = {f"{i:06d}.ppm": _ppm(i) for i in range(3)}
    src, rewrite = _images_as("webdataset", tmp_path, images)
    run = run_file(name="shards", images={"kind": "webdataset", "path": str(src.shards)}, batch_size=2)
    first = compare(run, out=tmp_path / "out").results.table
    assert compare(run, out=tmp_path / "out").cached == ["toy:vit"]  # unchanged: served from the part
    rewrite("000001.ppm", _ppm(99))
    again = compare(run, out=tmp_path / "out")
    assert again.cached == []  # today: the old part, computed from the old pixels
    by = ["image", "layer", "head"]
    a, b = (t.sort_values(by).set_index(by)["value"] for t in (first, again.results.table))
    changed = (a - b).abs().groupby(level="image").max()
    assert changed["s-000.tar/000001"] > 1e-3 and changed.drop("s-000.tar/000001").max() < 1e-5


@pytest.mark.parametrize("kind", ["hf-parquet", "hf-disk"])
def test_an_empty_image_cell_is_a_skipped_image_not_a_lost_model(pm, tmp_path, kind):
    # issue 19.4: one None cell raised AttributeError and discarded the model's whole work
    src, _ = _images_as(kind, tmp_path, {f"{i:06d}.ppm": _ppm(i) for i in range(4)})
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "hf-parquet":
        t = pq.read_table(src.path)
        cells = t.column("image").to_pylist()
        cells[2] = None
        pq.write_table(t.set_column(0, "image", pa.array(cells, t.schema.field("image").type)), src.path)
    else:
        datasets = pytest.importorskip("datasets")
        ds = datasets.load_from_disk(str(src.path))
        cells = list(ds.cast_column("image", datasets.Image(decode=False))["image"])
        cells[2] = None
        ds = datasets.Dataset.from_dict({"image": cells, "label": ds["label"]}, features=ds.features)
        shutil.rmtree(src.path)
        ds.save_to_disk(str(src.path))
    s = pk.resolve_images(src)
    res = pk.probe(pm, s, ["mad"], batch_size=4)
    empty = s.names[2]
    assert sorted(res.table["image"].unique()) == sorted(n for n in s.names if n != empty)
    assert [n for n, _ in res.meta["images"]["skipped"]] == [empty]
    with pytest.raises(ImageError, match="empty"):
        pk.probe(pm, src, ["mad"], batch_size=4, strict=True)


def test_a_class_folder_with_a_non_utf8_file_name_is_probed(pm, class_tree):
    # issue 19.14: UnicodeEncodeError in the fingerprint; a plain folder handled the same name
    shutil.copy(class_tree / "cat" / "coffee.jpg", os.path.join(os.fsencode(class_tree / "cat"), b"\xffraw.jpg"))
    res = pk.probe(pm, ClassFolder(class_tree), ["mad"], batch_size=4)
    assert "cat/\\xffraw.jpg" in set(res.table["image"])
    assert dict(zip(res.table["image"], res.table["label"]))["cat/\\xffraw.jpg"] == "cat"


@pytest.mark.parametrize("file", ["m.csv", "m.parquet"])
def test_a_manifest_row_without_a_path_is_refused_naming_the_row(class_tree, tmp_path, file):
    # issue 19.15: an empty path cell resolved to the manifest's folder (IsADirectoryError traceback)
    rows = pd.DataFrame({"path": ["classes/cat/chelsea.jpg", "", "classes/space/rocket.jpg"]})
    if file == "m.csv":
        rows.to_csv(tmp_path / file, index=False)
    else:
        rows.assign(path=[rows.path[0], None, rows.path[2]]).to_parquet(tmp_path / file)
    with pytest.raises(ImageError) as err:
        Manifest(tmp_path / file).image_set()
    msg = str(err.value)
    where = "line 3" if file == "m.csv" else "row 2"
    assert f"The manifest {tmp_path / file} has no path in its 'path' column at {where}" in msg, msg
    assert "\n" not in msg
    pd.DataFrame({"path": ["classes/cat/chelsea.jpg", "classes/cat"]}).to_csv(tmp_path / "dir.csv", index=False)
    with pytest.raises(ImageError, match=r"1 path\(s\) of the manifest dir.csv are not files, e.g. classes/cat"):
        Manifest(tmp_path / "dir.csv").image_set()


def test_a_webdataset_label_that_is_not_utf8_names_shard_and_member(tmp_path):
    # issue 19.16: UnicodeDecodeError traceback
    _tar(tmp_path / "s.tar", {"a.ppm": _ppm(0), "a.cls": b"cat", "b.ppm": _ppm(1), "b.cls": b"\xff\xfe"})
    with pytest.raises(ImageError) as err:
        WebDataset(tmp_path / "s.tar").image_set()
    msg = str(err.value)
    assert msg.startswith(f"The label member b.cls of {tmp_path / 's.tar'} is not UTF-8 text") and "\n" not in msg


def test_a_truncated_shard_probes_its_intact_members_and_skips_the_rest_by_name(pm, tmp_path, caplog):
    # issue 19.17: refused with advice to decompress .tar.gz, and its intact members dropped
    members = {}
    for i in range(4):
        members[f"{i:06d}.ppm"], members[f"{i:06d}.cls"] = _ppm(i), b"cat" if i % 2 else b"dog"
    _tar(tmp_path / "s-000.tar", members)
    _tar(tmp_path / "s-001.tar", {"000009.ppm": _ppm(9), "000009.cls": b"cat", "000010.ppm": _ppm(10),
                                  "000010.cls": b"dog"})
    whole = (tmp_path / "s-000.tar").read_bytes()
    with tarfile.open(tmp_path / "s-000.tar") as tar:
        cut_in = tar.getmember("000002.ppm")
    (tmp_path / "s-000.tar").write_bytes(whole[:cut_in.offset_data + 100])  # a copy cut short in member 2
    with tarfile.open(tmp_path / "s-001.tar") as tar:
        boundary = tar.getmember("000010.ppm").offset  # cut between two samples: tarfile reads no error
    (tmp_path / "s-001.tar").write_bytes((tmp_path / "s-001.tar").read_bytes()[:boundary])
    with caplog.at_level(logging.WARNING, logger="probekit.inputs.sources"):
        s = WebDataset(tmp_path).image_set()
    assert s.names == ["s-000.tar/000000", "s-000.tar/000001", "s-001.tar/000009"]
    assert s.labels == ["dog", "cat", "cat"]
    why = dict(s.skipped)
    assert why["s-000.tar/000002"].startswith("cut short: the shard is truncated")
    assert why[str(tmp_path / "s-000.tar")].startswith("truncated tar shard: it ends after")
    assert why[str(tmp_path / "s-001.tar")].startswith("truncated tar shard: it ends after")
    assert "s-000.tar is truncated" in caplog.text and "s-001.tar is truncated" in caplog.text
    assert "decompress" not in caplog.text
    res = pk.probe(pm, WebDataset(tmp_path), ["mad"], batch_size=2)
    assert sorted(res.table["image"].unique()) == s.names
    assert "s-000.tar/000002" in dict(res.meta["images"]["skipped"])
    with pytest.raises(ImageError) as err:
        WebDataset(tmp_path).image_set(strict=True)
    msg = str(err.value)
    assert "truncated" in msg and "drop --strict" in msg and "\n" not in msg and "decompress" not in msg
