"""The one image loader (sslpipe.data.images): odd-but-valid modes against conversions written out with numpy,
and the scan's check against a full PIL decode."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from sslpipe.data.images import image_problem, is_image_file, load_rgb, to_rgb


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour`` composited on white with ``alpha`` (0..255): c * a + 255 * (1 - a), rounded."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(colour.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.int64)


# ------------------------------------------------------------------ 16-bit and 32-bit greyscale
def _sixteen_bit_values() -> np.ndarray:
    # both ends, a half-way value per 8-bit step (257 k + 128 rounds up), and a spread in between
    values = np.concatenate([[0, 1, 128, 129, 65534, 65535], 257 * np.arange(256) + 128, np.arange(0, 65536, 97)])
    values = values[values <= 65535]
    return np.resize(values, (40, 50)).astype(np.uint16)


def test_sixteen_bit_png_scales_by_bit_depth(tmp_path):
    values = _sixteen_bit_values()
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"  # really a 16-bit file
    expected = np.round(values / 257.0).astype(np.int64)  # 65535 -> 255: v * 255 / 65535 = v / 257
    got = _rgb(load_rgb(path))
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], expected)
    # not what PIL's own conversion gives: it clips everything above 255 to white
    clipped = np.asarray(Image.open(path).convert("RGB"))[..., 0]
    assert (clipped == 255).mean() > 0.9 and (expected == 255).mean() < 0.1


def test_sixteen_bit_big_endian_tiff(tmp_path):
    values = _sixteen_bit_values()
    image = Image.frombytes("I;16B", (values.shape[1], values.shape[0]), values.astype(">u2").tobytes())
    path = str(tmp_path / "deep.tif")
    image.save(path)
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_array_equal(_rgb(load_rgb(path))[..., 1], np.round(values / 257.0))


def test_mode_i_is_sixteen_bit_unless_the_tiff_says_32(tmp_path):
    values = _sixteen_bit_values().astype(np.int32)
    in_memory = Image.fromarray(values)  # mode I, no header: 16-bit data (how older Pillow opens 16-bit PNGs)
    assert in_memory.mode == "I"
    np.testing.assert_array_equal(_rgb(to_rgb(in_memory))[..., 0], np.round(values / 257.0))
    wide = np.resize(np.array([0, 2**20, 2**30, 2**31 - 1, -5], dtype=np.int32), (4, 5))
    path = str(tmp_path / "wide.tif")
    Image.fromarray(wide).save(path)  # BitsPerSample 32
    expected = np.round(wide.clip(0, None) * 255.0 / (2**31 - 1))
    np.testing.assert_array_equal(_rgb(load_rgb(path))[..., 2], expected)


# ------------------------------------------------------------------ transparency, palette, CMYK, greyscale
def test_palette_with_transparent_index_on_white(tmp_path):
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (16, 3))
    indices = rng.integers(0, 16, (12, 10)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.astype(np.uint8).ravel().tolist())
    image.info["transparency"] = 3
    path = str(tmp_path / "palette.png")
    image.save(path, transparency=3)
    loaded = Image.open(path)
    assert loaded.mode == "P" and "transparency" in loaded.info
    expected = palette[indices]
    expected[indices == 3] = 255  # the transparent index shows the white background
    np.testing.assert_array_equal(_rgb(load_rgb(path)), expected)


def test_palette_with_alpha_per_entry(tmp_path):
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (8, 3))
    alphas = np.array([0, 40, 128, 200, 255, 255, 17, 90])
    indices = rng.integers(0, 8, (9, 11)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.astype(np.uint8).ravel().tolist())
    path = str(tmp_path / "palette_alpha.png")
    image.save(path, transparency=bytes(alphas.astype(np.uint8)))
    assert isinstance(Image.open(path).info.get("transparency"), bytes)
    expected = _over_white(palette[indices], alphas[indices])
    np.testing.assert_allclose(_rgb(load_rgb(path)), expected, atol=1)


def test_la_and_rgba_composited_on_white(tmp_path):
    rng = np.random.default_rng(2)
    grey, alpha = rng.integers(0, 256, (2, 10, 13), dtype=np.uint8)
    alpha[0, :4] = [0, 1, 254, 255]
    la_path = str(tmp_path / "la.png")
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(la_path)
    assert Image.open(la_path).mode == "LA"
    expected = _over_white(np.repeat(grey[..., None], 3, -1), alpha)
    np.testing.assert_allclose(_rgb(load_rgb(la_path)), expected, atol=1)
    assert (_rgb(load_rgb(la_path))[alpha == 0] == 255).all()  # fully transparent: exactly white

    colour = rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)
    rgba_path = str(tmp_path / "rgba.png")
    Image.fromarray(np.concatenate([colour, alpha[..., None]], -1), mode="RGBA").save(rgba_path)
    np.testing.assert_allclose(_rgb(load_rgb(rgba_path)), _over_white(colour, alpha), atol=1)


def test_cmyk(tmp_path):
    rng = np.random.default_rng(3)
    cmyk = rng.integers(0, 256, (8, 9, 4), dtype=np.uint8)
    cmyk[0, 0] = [0, 0, 0, 0]  # white
    cmyk[0, 1] = [0, 0, 0, 255]  # black
    path = str(tmp_path / "cmyk.tif")  # TIFF: lossless, so the file holds exactly these values
    Image.fromarray(cmyk, mode="CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.round((255 - c) * (255 - k) / 255)  # naive (no ICC profile) CMYK -> RGB
    got = _rgb(load_rgb(path))
    np.testing.assert_allclose(got, expected, atol=1)
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [0, 0, 0]


def test_greyscale_and_rgb(tmp_path):
    grey = np.random.default_rng(4).integers(0, 256, (7, 6), dtype=np.uint8)
    path = str(tmp_path / "grey.png")
    Image.fromarray(grey, mode="L").save(path)
    np.testing.assert_array_equal(_rgb(load_rgb(path)), np.repeat(grey[..., None].astype(np.int64), 3, -1))
    colour = np.random.default_rng(5).integers(0, 256, (7, 6, 3), dtype=np.uint8)
    Image.fromarray(colour).save(path)
    np.testing.assert_array_equal(_rgb(load_rgb(path)), colour)


def test_is_image_file():
    assert all(is_image_file(n) for n in ("a.jpg", "b.JPEG", "c.Png", "d.webp", "e.TIFF", "f.gif", "g.bmp"))
    assert not any(is_image_file(n) for n in ("notes.txt", "a.jpg.bak", "._a.jpg", ".hidden.png", "jpg"))


# ------------------------------------------------------------------ the scan's check = a full decode
def _full_decode_fails(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
        return False
    except Exception:
        return True


@pytest.mark.parametrize(
    "fmt,options",
    [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("TIFF", {})],
)
def test_check_agrees_with_full_decode_on_truncation(tmp_path, fmt, options):
    """image_problem decodes JPEGs at 1/8 scale; at every truncation point it must fail exactly when a full
    decode does (Image.verify() would pass truncated JPEGs)."""
    pixels = np.random.default_rng(6).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    data = buffer.getvalue()
    path = str(tmp_path / f"image.{fmt.lower()}")
    cuts = sorted({1, 10, len(data) // 2, len(data) - 2, len(data) - 1, *range(50, len(data), max(1, len(data) // 25))})
    for cut in [*cuts, len(data)]:
        with open(path, "wb") as f:
            f.write(data[:cut])
        assert (image_problem(path) is not None) == _full_decode_fails(data[:cut]), f"{fmt} cut at {cut}/{len(data)}"
    assert image_problem(path) is None  # the whole file reads
    if fmt == "JPEG":
        with open(path, "wb") as f:
            f.write(data[:-1])
        Image.open(path).verify()  # verify() does not notice a truncated JPEG: why the check decodes
        assert "truncated" in image_problem(path)


def test_check_names_the_kind_of_problem(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert image_problem(str(empty)) == "empty file (0 bytes)"
    assert image_problem(str(text)) == "not an image PIL can read"
    assert "No such file" in image_problem(str(tmp_path / "missing.jpg"))
    assert os.path.getsize(empty) == 0
