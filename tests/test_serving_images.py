"""The one image preprocessing shared by serving and local scoring: formats, modes, refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pngs import png_bomb

from deqguard.serving.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_b64,
    decode_b64_image,
    decode_image,
    encode_b64,
)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
@pytest.mark.parametrize("channels", [1, 3])
def test_formats_give_model_shaped_unit_arrays(fmt, channels):
    data = _encode(_gradient(50, 37), fmt)
    x = decode_image(data, channels=channels, height=28, width=28)
    assert x.shape == (channels, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01


def test_matches_torchvision_resize_pipeline():
    """Documented equivalence: convert, then torchvision Resize((h, w)) (bilinear, antialias)."""
    from torchvision import transforms

    im = _gradient(90, 61)
    pipe = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor()])
    for channels, mode in ((1, "L"), (3, "RGB")):
        want = pipe(im.convert(mode)).numpy()
        got = decode_image(_encode(im, "PNG"), channels=channels, height=28, width=28)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_exact_size_grayscale_is_bytes_over_255():
    arr = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    x = decode_image(_encode(Image.fromarray(arr, "L"), "PNG"), channels=1, height=28, width=28)
    np.testing.assert_array_equal(x[0], arr.astype(np.float32) / 255.0)


def test_alpha_is_composited_over_black():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255          # white everywhere ...
    rgba[:4, :, 3] = 255         # ... opaque in the top half, transparent in the bottom half
    x = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), channels=3, height=8, width=8)
    assert np.all(x[:, :4] == 1.0) and np.all(x[:, 4:] == 0.0)


def test_sixteen_bit_png_is_rescaled_not_clipped():
    arr = np.full((10, 10), 32768, dtype=np.uint16)
    im = Image.fromarray(arr)
    x = decode_image(_encode(im, "PNG"), channels=1, height=10, width=10)
    np.testing.assert_allclose(x, 32768 / 65535, atol=1e-6)
    x3 = decode_image(_encode(im, "PNG"), channels=3, height=5, width=5)
    assert x3.shape == (3, 5, 5)


def test_palette_and_cmyk_modes():
    for mode in ("P", "CMYK", "1", "LA"):
        im = _gradient(20, 20).convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
        x = decode_image(_encode(im, fmt), channels=3, height=28, width=28)
        assert x.shape == (3, 28, 28)


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"hello, this is not an image at all", "not a recognised image"),
    (b"\x89PNG\r\n\x1a\n", "unreadable|corrupt|not a recognised"),
])
def test_non_images_are_refused(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data, channels=1, height=28, width=28)


def test_truncated_png_is_refused():
    data = _encode(_gradient(64, 64), "PNG")
    # (cutting only the trailing IEND/CRC leaves every pixel decodable: PIL accepts that, so do we)
    for cut in (len(data) // 2, len(data) - 200, 60):
        with pytest.raises(ImageError, match="corrupt|truncated|unreadable"):
            decode_image(data[:cut], channels=3, height=28, width=28)


def test_truncated_jpeg_is_refused():
    data = _encode(_gradient(64, 64), "JPEG")
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2], channels=3, height=28, width=28)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png_bomb(100_000, 100_000), channels=1, height=28, width=28)
    # also above PIL's own hard limit (its DecompressionBombError becomes an ImageError)
    with pytest.raises(ImageError, match="decompression bomb|too large"):
        decode_image(png_bomb(60_000, 60_000), channels=1, height=28, width=28,
                     max_pixels=10**10)
    with pytest.raises(ImageError, match="over the limit of 100"):
        decode_image(_encode(_gradient(11, 10), "PNG"), channels=1, height=4, width=4,
                     max_pixels=100)
    assert DEFAULT_MAX_PIXELS >= 4096 * 4096


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_base64_round_trip_and_strictness():
    data = _encode(_gradient(9, 9), "PNG")
    text = encode_b64(data)
    assert decode_b64(text) == data
    assert decode_b64("data:image/png;base64," + text) == data
    assert decode_b64(text[:10] + "\n" + text[10:]) == data
    for bad in ("not base64!!", "abc", "", "   "):
        with pytest.raises(ImageError, match="base64"):
            decode_b64(bad)
    x = decode_b64_image(text, channels=1, height=9, width=9)
    assert x.shape == (1, 9, 9)
