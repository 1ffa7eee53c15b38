"""Image sources: folders (recursive), files, the bundled set, tensors; bad input is clear."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import probekit as pk
from probekit.errors import ImageError
from probekit.images import resolve_images, to_rgb


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
    with caplog.at_level(logging.WARNING, logger="probekit.images"):
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
    import probekit.images

    s = resolve_images(folder)
    reads = []
    real = probekit.images.file_digest
    monkeypatch.setattr(probekit.images, "file_digest", lambda path: reads.append(path) or real(path))
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
