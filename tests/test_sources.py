"""Image sources: class folders, manifests, WebDataset shards, ``datasets`` data; sampling; labels.

Each labelled source must give the same per-image values as the same files passed as paths,
with a ``label`` column that round-trips parquet and CSV; listing 50,000 images opens none.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import probekit as pk
from probekit.compare import compare
from probekit.errors import ConfigError, ImageError
from probekit.results import Results
from probekit.sources import ClassFolder, HFDataset, Manifest, WebDataset, sample_indices

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


RUN = """\
name: labelled
models: [toy:vit]
images: {{kind: {kind}, path: {path}, count: 4, seed: 2, stratify: true}}
metrics: [mad]
batch_size: 3
figures: [labels]
"""


def test_run_file_source_records_labels_and_sampling_in_run_json(class_tree, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(RUN.format(kind="classes", path=class_tree))
    cmp = compare(run, out=tmp_path / "out")
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert Counter(rec["images"]["labels"]) == {"cat": 2, "space": 2}
    assert rec["images"]["source"]["kind"] == "classes" and rec["images"]["source"]["seed"] == 2
    back = Results.read_parquet(tmp_path / "out" / "results.parquet")
    assert dict(zip(back.table["image"].astype(str), back.table["label"])) == dict(
        zip(rec["images"]["names"], rec["images"]["labels"]))
    assert cmp.results.table["label"].notna().all()
    assert sorted(p.name for p in cmp.figures) == ["labels_mad.png", "labels_mad.svg"]  # a line per label
    run.write_text(RUN.format(kind="files", path=class_tree))
    with pytest.raises(ConfigError, match="stratify needs labels"):
        compare(run, out=tmp_path / "out2")
