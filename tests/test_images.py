"""Image sources: folders (recursive), files, the bundled set, tensors; bad input is clear."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import probekit as pk
from probekit.inputs.images import ImageSet
from probekit.errors import ImageError
from probekit.inputs.images import resolve_images, to_rgb


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(tmp_path / "sub" / "gray.jpg")
    Image.fromarray(np.zeros((20, 30, 4), np.uint8)).save(tmp_path / "sub" / "rgba.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.txt").write_text("hello")
    return tmp_path


def test_folder_is_recursive_and_skips_unreadable_with_names(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="probekit.inputs.images"):
        s = resolve_images(folder)
    assert s.names == ["a.png", "sub/gray.jpg", "sub/rgba.png"]
    assert dict(s.skipped) .keys() == {"broken.jpg", "notes.txt"}
    assert "Skipped 1 file(s) that are not images: broken.jpg" in caplog.text


def test_strict_stops_at_unreadable(folder):
    with pytest.raises(ImageError, match=r"broken\.jpg is not a readable image \(not an image: .*drop --strict"):
        resolve_images(folder, strict=True)


def test_grayscale_and_rgba_become_rgb(folder):
    s = resolve_images(folder)
    ds = s.dataset(lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1))
    for i in range(len(s)):
        assert ds[i][1].shape == (3, 20, 30)
    assert to_rgb(Image.new("L", (2, 2))).mode == "RGB"


def test_bundled_samples_and_seeded_subsets():
    s = resolve_images("sample")
    assert len(s) == len(pk.sample_images()) >= 5
    assert "camera.jpg" in s.names
    a, b = resolve_images("sample", count=3, seed=1), resolve_images("sample", count=3, seed=1)
    assert a.names == b.names and len(a) == 3
    assert a.fingerprint() == b.fingerprint() != s.fingerprint()


def test_bad_inputs_say_what_to_do(tmp_path):
    with pytest.raises(ImageError, match="No such file or folder"):
        resolve_images(tmp_path / "missing")
    with pytest.raises(ImageError, match="empty"):
        resolve_images(tmp_path)
    with pytest.raises(ImageError, match=r"\[N, C, H, W\].*\(2, 1, 8, 8, 1\)"):
        resolve_images(torch.zeros(2, 1, 8, 8, 1))  # channel counts are checked against the model
    s = resolve_images(torch.zeros(2, 3, 8, 8))
    assert s.names == ["0", "1"]


def test_exif_orientation_is_applied(tmp_path):
    # a phone photo stored landscape with "rotate 90" in its EXIF must reach the model upright
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, :5] = 255  # a white band on the left edge
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    im.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    s = resolve_images(tmp_path)
    x = s.dataset(lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1))[0][1]
    assert x.shape == (3, 30, 20)
    assert x[0, :5].float().mean() > 200 and x[0, -5:].float().mean() < 50  # the band is now on top


# regression: in-memory (PIL) image sets all had the same fingerprint whatever their pixels
def test_fingerprint_of_in_memory_images_follows_their_pixels():
    black = pk.resolve_images([Image.new("RGB", (8, 8), (0, 0, 0))]).fingerprint()
    white = pk.resolve_images([Image.new("RGB", (8, 8), (255, 255, 255))]).fingerprint()
    assert black != white
    assert pk.resolve_images([Image.new("RGB", (8, 8), (0, 0, 0))]).fingerprint() == black


def test_fingerprint_reads_the_files_once(folder, monkeypatch):
    # a comparison asks for the fingerprint once per model: the files must not be reread
    import probekit.inputs.images

    s = resolve_images(folder)
    reads = []
    real = probekit.inputs.images.file_digest_head
    monkeypatch.setattr(probekit.inputs.images, "file_digest_head", lambda path: reads.append(path) or real(path))
    first = s.fingerprint()
    assert len(reads) == len(s) and s.fingerprint() == first and len(reads) == len(s)


def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (gray [H, W] or 48-bit RGB [H, W, 3]) written by hand: PIL cannot write 48-bit RGB."""
    import struct
    import zlib

    a = np.asarray(a, dtype=">u2")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    head = struct.pack(">IIBBBBB", w, h, 16, 2 if a.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["png-gray16", "png-rgb48", "I;16", "I;16B", "I"])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, kind):
    rng = np.random.default_rng(0)
    ref8 = rng.integers(0, 256, size=(24, 20), dtype=np.uint8)  # the 8-bit reference
    v16 = ref8.astype(np.uint32) * 257  # the same picture at 16 bits (255 -> 65535)
    if kind.startswith("png"):
        rgb = kind == "png-rgb48"
        data = np.stack([v16, v16[::-1], 65535 - v16], -1) if rgb else v16
        want = np.stack([ref8, ref8[::-1], 255 - ref8], -1) if rgb else np.repeat(ref8[..., None], 3, -1)
        path = tmp_path / "deep.png"
        path.write_bytes(_png16(data))
        ds = resolve_images(path).dataset(lambda im: torch.from_numpy(np.asarray(im).copy()))
        got = ds[0][1].numpy()  # decoded the way the engine decodes files
    else:
        raw = v16.astype("<i4" if kind == "I" else (">u2" if kind.endswith("B") else "<u2")).tobytes()
        im = Image.frombytes(kind, (20, 24), raw)
        want, got = np.repeat(ref8[..., None], 3, -1), np.asarray(to_rgb(im))
    np.testing.assert_array_equal(got, want)  # today: 99.6% of pixels white (clipped at 255)


def test_float_images_are_read_as_zero_to_one():
    a = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    got = np.asarray(to_rgb(Image.fromarray(a)))[..., 0]
    np.testing.assert_array_equal(got, np.arange(256, dtype=np.uint8).reshape(16, 16))


# -- issue 19.3: image identities are unique across every source of a run ------------------------
def _png_file(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def test_same_named_images_of_two_folders_stay_two_images(tmp_path, monkeypatch, toy_backend):
    _png_file(tmp_path / "A" / "x.png", 0)
    _png_file(tmp_path / "B" / "x.png", 1)
    _png_file(tmp_path / "B" / "y.png", 2)
    monkeypatch.chdir(tmp_path)
    assert resolve_images("B").names == ["x.png", "y.png"]  # one folder: names relative to it, as before
    s = resolve_images(["A", "B"])
    assert s.names == ["A/x.png", "B/x.png", "B/y.png"]  # today: x.png, x.png, y.png
    res = pk.probe(pk.load("toy:vit"), ["A", "B"], ["mad"])
    assert res.table["image"].nunique() == 3 and (res.table.groupby("image").size() == res.table.groupby(
        "image").size().iloc[0]).all()
    for twice in (["A", "A"], ["A", "A/x.png"], ["A", "./A"]):
        with pytest.raises(ImageError) as err:
            resolve_images(twice)
        assert "twice" in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_same_named_shards_and_parquet_files_of_two_folders_stay_apart(tmp_path):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from probekit.inputs.sources import HFDataset, WebDataset

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        with tarfile.open(tmp_path / d / "val-000.tar", "w") as tar:
            info = tarfile.TarInfo("000000.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
        (tmp_path / "pq" / d).mkdir(parents=True)
        pq.write_table(pa.table({"image": [{"bytes": buf.getvalue(), "path": None}]}), tmp_path / "pq" / d / "train.parquet")
    s = WebDataset([tmp_path / "a" / "val-000.tar", tmp_path / "b" / "val-000.tar"]).image_set()
    assert len(set(s.names)) == 2, s.names  # today: val-000.tar/000000 twice
    assert HFDataset(tmp_path / "pq").image_set().names == ["a/train.parquet#0", "b/train.parquet#0"]
    with pytest.raises(ImageError, match="twice"):
        WebDataset([tmp_path / "a" / "val-000.tar", tmp_path / "a" / "val-000.tar"]).image_set()


def test_an_image_set_with_two_images_of_one_name_is_refused():
    with pytest.raises(ImageError) as err:
        ImageSet(names=["a.png", "b.png", "a.png"], paths=[None] * 3)
    assert "'a.png'" in str(err.value) and "\n" not in str(err.value)
    raw = b"\xffa.png".decode("utf-8", "surrogateescape")  # the byte 0xff, as os.listdir keeps it
    s = ImageSet(names=[raw], paths=[None])
    assert s.names == ["\\xffa.png"]  # every name can be written (UTF-8 tables, JSON, hashes)
    with pytest.raises(ImageError, match="twice"):  # ... so a name that is written that way collides
        ImageSet(names=[raw, "\\xffa.png"], paths=[None] * 2)


# -- issue 19.22: multi-frame images are probed at frame 0, and the run says so -------------------
def _multi_frame(folder):
    folder.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 120, 240)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:2])
    frames[0].save(folder / "still.gif")
    _png_file(folder / "plain.png", 3)


def test_multi_frame_images_are_noted_by_name(tmp_path, caplog, toy_backend):
    _multi_frame(tmp_path / "imgs" / "cls")
    pm = pk.load("toy:vit")
    for images, prefix in ((tmp_path / "imgs" / "cls", ""), (pk.sources.ClassFolder(tmp_path / "imgs"), "cls/")):
        with caplog.at_level(logging.WARNING, logger="probekit.inputs.images"):
            res = pk.probe(pm, images, ["mad"])
        notes = dict(res.meta["images"]["notes"])  # today: no notes at all, frame 0 silently
        assert sorted(notes) == [prefix + "anim.gif", prefix + "pages.tif"]
        assert notes[prefix + "anim.gif"] == "3 frames: only the first was probed"
        assert notes[prefix + "pages.tif"] == "2 frames: only the first was probed"
        assert res.table["image"].nunique() == 4
        assert f"Probed only the first frame of 2 multi-frame image(s): {prefix}anim.gif, {prefix}pages.tif" in caplog.text
        caplog.clear()


def test_a_run_records_and_reports_its_multi_frame_images(tmp_path, toy_backend, run_file):
    import json

    from probekit.api import compare

    _multi_frame(tmp_path / "imgs")
    run = run_file(images={"path": str(tmp_path / "imgs")})
    compare(run, out=tmp_path / "out")
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["images"]["notes"] == [["anim.gif", "3 frames: only the first was probed"],
                                      ["pages.tif", "2 frames: only the first was probed"]]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "2 multi-frame image(s) (animated GIF, multi-page TIFF) were probed at their first frame only: " \
           "anim.gif, pages.tif." in html


def test_a_subset_without_digests_decodes_the_same_and_pickles_smaller(folder):
    """What the Ray engine ships to its decoding tasks: the same pixels and names, without the content
    digests (its fingerprint, if ever asked for, reads the files again and agrees)."""
    import pickle

    from probekit.inputs.images import collate

    imgs = resolve_images(folder)
    imgs.fingerprint()  # digests read
    full, bare = imgs.subset([2, 0]), imgs.subset([2, 0], digests=False)
    assert len(pickle.dumps(bare)) < len(pickle.dumps(full)) and bare._ids is None

    def pixels(s):
        ds = s.dataset(lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)))
        return collate([ds[j] for j in range(len(s))])

    (k1, x1), (k2, x2) = pixels(full), pixels(bare)
    assert torch.equal(k1, k2) and torch.equal(x1, x2) and bare.names == full.names
    assert bare.fingerprint() == full.fingerprint()
