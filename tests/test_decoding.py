"""The one image decoder (maelab.data.folders.open_rgb) is never silently wrong: EXIF orientation,
32-bit integer images, PNG files whose pixel data is cut short, and huge images."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from maelab.data import folders
from maelab.data.folders import image_sizes, open_rgb
from maelab.errors import MaelabError


def test_exif_orientation_is_applied_and_header_sizes_follow_it(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    img = open_rgb(path)
    assert img.size == (20, 40)  # (width, height) as displayed
    assert np.asarray(img)[:10].mean() > 200 and np.asarray(img)[-10:].mean() < 50  # white ends up on top
    assert image_sizes([str(path)]) == [(40, 20)]  # (height, width), the same as decoded


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_header_sizes_equal_decoded_sizes_for_every_rotated_format(tmp_path, suffix):
    """Pillow's TIFF reader reports a rotated TIFF's size as displayed already; it was swapped once more, so
    `--in-memory auto`, segmentation's label check and detection's size check saw 32x64 for a 64x32 image."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"upright{suffix}"
    Image.new("RGB", (64, 32), "red").save(path, exif=exif.tobytes())
    width, height = open_rgb(path).size
    assert (width, height) == (32, 64) and image_sizes([str(path)]) == [(height, width)]


def test_header_reads_of_a_big_image_print_no_pillow_warning(tmp_path, monkeypatch):
    """The folder scan's probe and size read printed Pillow's DecompressionBombWarning (two raw lines per
    file) for images open_rgb then downscales by design."""
    path = tmp_path / "big.png"
    Image.new("RGB", (12, 12)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: over the warning limit, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert folders._probe(str(path)) is None and image_sizes([str(path)]) == [(12, 12)]


def test_32_bit_integer_images_use_the_range_of_their_values(tmp_path):
    values = np.linspace(0, 255_000, 16 * 16).reshape(16, 16).astype(np.int32)
    path = tmp_path / "counts.tif"
    Image.fromarray(values, mode="I").save(path)
    out = np.asarray(open_rgb(path))[..., 0].astype(int)
    expected = np.rint(values / 255_000 * 255)
    assert np.abs(out - expected).max() <= 1  # was all black (scaled by 2^32 - 1) or clipped white (by 2^16 - 1)


def _png(width: int, height: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_float_images_in_0_1_with_an_overshoot_are_not_read_as_0_255(tmp_path):
    """A [0, 1] float TIFF with one resampling overshoot (1.02) was read on the 0-255 scale: mid-grey became
    black. Values that stay under 1.5 are on the [0, 1] scale (the overshoot clipped); a dark 0-255 image
    with a few bright pixels stays 0-255."""
    half = np.full((8, 8), 0.5, np.float32)
    over = half.copy()
    over[0, 0] = 1.02
    scale255 = np.full((8, 8), 128.0, np.float32)
    for name, arr, expected in (("half", half, 128), ("over", over, 128), ("scale255", scale255, 128)):
        Image.fromarray(arr, "F").save(tmp_path / f"{name}.tif")
        pixels = np.asarray(open_rgb(str(tmp_path / f"{name}.tif")))
        assert pixels[4, 4].tolist() == [expected] * 3, name
    assert np.asarray(open_rgb(str(tmp_path / "over.tif")))[0, 0].tolist() == [255] * 3
    night = np.random.default_rng(0).uniform(0, 1, (20, 20)).astype(np.float32)  # a dark 0-255 image, a few stars
    night[::7, ::7] = 200.0
    Image.fromarray(night, "F").save(tmp_path / "night.tif")
    assert np.asarray(open_rgb(str(tmp_path / "night.tif"))).mean() < 30  # stays dark, not multiplied by 255


def test_a_png_whose_pixel_data_ends_early_is_unreadable(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rows = [b"\x00" + arr[r].tobytes() for r in range(64)]
    whole, short = tmp_path / "whole.png", tmp_path / "short.png"
    whole.write_bytes(_png(64, 64, b"".join(rows)))
    short.write_bytes(_png(64, 64, b"".join(rows[:32])))  # valid chunks, half the rows
    assert np.array_equal(np.asarray(open_rgb(whole)), arr)
    with pytest.raises(MaelabError, match="short.png.*ends before the last row"):
        open_rgb(short)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "1", "I;16", "LA"])
def test_complete_pngs_of_every_mode_decode(tmp_path, mode):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 36, 3), dtype=np.uint8)).convert(
        "I;16" if mode == "I;16" else mode)
    path = tmp_path / f"{mode.replace(';', '')}.png"
    img.save(path)
    assert open_rgb(path).size == (36, 24)


def test_huge_images_are_decoded_downscaled_without_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "MAX_PIXELS", 100 * 100)
    for name in ("big.jpg", "big.png"):
        path = tmp_path / name
        Image.new("RGB", (400, 300), (10, 200, 30)).save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            img = open_rgb(path)
        assert img.width * img.height <= 100 * 100 and abs(img.width / img.height - 4 / 3) < 0.1, (name, img.size)


def test_images_beyond_the_hard_limit_are_refused_with_their_name(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    path = tmp_path / "bomb.png"
    buf = io.BytesIO()
    Image.new("L", (200, 200)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    with pytest.raises(MaelabError, match="bomb.png"):
        open_rgb(path)
