"""Image decoding: odd but valid images are handled, bad files give errors naming the path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flawscope.data.images import load_images, read_image, read_mask
from flawscope.errors import ImageReadError


@pytest.fixture
def rgb(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(arr).save(path)
    return path, arr


def test_rgb_roundtrip(rgb):
    path, arr = rgb
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (40, 50, 3)
    np.testing.assert_array_equal(out, arr)


def test_gray_stays_gray_and_converts(tmp_path):
    arr = np.arange(0, 250, dtype=np.uint8).reshape(10, 25)
    path = tmp_path / "g.png"
    Image.fromarray(arr, "L").save(path)
    assert read_image(path).shape == (10, 25, 1)
    rgb = read_image(path, channels=3)
    assert rgb.shape == (10, 25, 3)
    np.testing.assert_array_equal(rgb[..., 0], arr)
    np.testing.assert_array_equal(rgb[..., 2], arr)
    back = read_image(path, channels=1)
    np.testing.assert_array_equal(back[..., 0], arr)


def test_rgb_to_gray_matches_pillow(rgb):
    path, arr = rgb
    gray = read_image(path, channels=1)[..., 0]
    expected = np.asarray(Image.fromarray(arr).convert("L"))
    assert np.abs(gray.astype(int) - expected.astype(int)).max() <= 1


def test_16bit_scaled_to_8bit(tmp_path):
    arr16 = np.linspace(0, 65535, 64 * 32).astype(np.uint16).reshape(64, 32)
    path = tmp_path / "deep.png"
    Image.fromarray(arr16).save(path)  # Pillow writes a 16-bit PNG
    out = read_image(path)
    assert out.shape == (64, 32, 1)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    np.testing.assert_allclose(out[..., 0], np.rint(arr16 / 257), atol=1)


def test_16bit_tiff(tmp_path):
    arr16 = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    path = tmp_path / "deep.tif"
    Image.fromarray(arr16).save(path)
    out = read_image(path, size=20)
    assert out.shape == (20, 20, 1) and out.max() > 200


def test_rgba_drops_alpha_and_palette(tmp_path):
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 10
    p = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(p)
    out = read_image(p)
    assert out.shape == (16, 16, 3) and (out[..., 0] == 200).all()
    pal = Image.fromarray(arr[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    pp = tmp_path / "p.png"
    pal.save(pp)
    out = read_image(pp)
    assert out.shape == (16, 16, 3) and abs(int(out[..., 0].mean()) - 200) <= 2


def test_tiny_and_large_images_resize(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((2, 3), 7, np.uint8)).save(tiny)
    assert read_image(tiny, size=(32, 48)).shape == (32, 48, 1)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((3000, 2500, 3), 120, np.uint8)).save(big, quality=90)
    out = read_image(big, size=64)
    assert out.shape == (64, 64, 3) and abs(int(out.mean()) - 120) <= 2


def test_area_resize_averages(tmp_path):
    arr = np.zeros((8, 8), np.uint8)
    arr[::2, ::2] = 255  # one bright pixel in every 2x2 block
    p = tmp_path / "checker.png"
    Image.fromarray(arr).save(p)
    out = read_image(p, size=4)[..., 0].astype(float)
    # antialiased shrinking: every output pixel mixes several source pixels (no aliasing of
    # the single bright pixel per 2x2 block), and the mean brightness is kept
    assert out.max() - out.min() <= 40 and abs(out.mean() - 64) <= 8


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
    ],
)
def test_bad_files_name_the_path(tmp_path, content, message):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as info:
        read_image(p)
    assert str(p) in str(info.value)


def test_truncated_file(tmp_path, rgb):
    path, _ = rgb
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated|corrupt") as info:
        read_image(cut)
    assert str(cut) in str(info.value)


def test_missing_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def test_load_images_skips_and_lists_bad(tmp_path, rgb):
    path, _ = rgb
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"bad\.jpg: empty file \(0 bytes\)"):
        load_images([path, bad], 16, 3)
    batch = load_images([path, bad, path], 16, 3, skip_bad=True)
    assert batch.pixels.shape == (2, 3, 16, 16)
    assert [p for p, _ in batch.skipped] == [bad]


def test_read_mask(tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 255
    p = tmp_path / "m.png"
    Image.fromarray(m).save(p)
    out = read_mask(p, (10, 10))
    assert out.dtype == bool and out.sum() > 0 and out[3, 3] and not out[0, 0]
    assert read_mask(None, (4, 6)).shape == (4, 6)
