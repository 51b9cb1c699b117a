"""Bytes of an encoded image -> the float array a checkpoint expects. THE preprocessing.

The server, the HTTP client's local batch scoring and the benchmarks all call `decode_image`, so a
file scores the same wherever it is scored. Torch-free (PIL + numpy): the client imports it.

Steps, in order (each documented because results depend on them):
1. Open lazily and read only the header; refuse more than `max_pixels` pixels before decoding
   anything (a 50 KiB PNG can claim 100 000 x 100 000 pixels: a decompression bomb).
2. Decode the first frame (animated GIF/WebP/APNG: frame 0), apply the EXIF orientation.
3. Colour: to "L" (ITU-R 601 luma, PIL's convert) for 1-channel models, to "RGB" for 3-channel
   ones; transparent pixels are composited over black (alpha premultiplied). 16-bit and float
   images are rescaled to [0, 1] from their own range (65535 for 16-bit), not clipped.
4. Resize to (width, height) with PIL's antialiased BILINEAR filter, aspect ratio NOT kept (the
   same as torchvision's `Resize((h, w))` on a PIL image, the usual training pipeline).
5. float32 [C, H, W] with values in [0, 1] (uint8 / 255).
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 4096 x 4096: far above any model input, small enough that decoding stays under ~200 MB.
DEFAULT_MAX_PIXELS = 4096 * 4096
RESAMPLE = Image.Resampling.BILINEAR
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class ImageError(ValueError):
    """The bytes are not an image this service can use; the message says why."""


def decode_b64(text: str) -> bytes:
    """Strict base64 (standard alphabet, padding checked); a `data:...;base64,` prefix and
    whitespace/newlines are tolerated because browsers and `base64` tools produce them."""
    if not isinstance(text, str):
        raise ImageError(f"expected a base64 string, got {type(text).__name__}")
    body = _WHITESPACE.sub("", _DATA_URL.sub("", text.strip(), count=1))
    if not body:
        raise ImageError("empty image: the base64 string is empty")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"invalid base64 ({exc}); send the image bytes base64-encoded") from None


def encode_b64(data: bytes) -> str:
    """Standard base64 text of `data` (what the wire contract carries)."""
    return base64.b64encode(data).decode("ascii")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty image: 0 bytes")
    try:
        im = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression bomb guard): {exc}") from None
    except UnidentifiedImageError:
        head = bytes(data[:8])
        raise ImageError(
            f"not a recognised image format ({len(data)} bytes starting {head!r}); "
            "send PNG, JPEG, WebP or another common format") from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise ImageError(f"unreadable image header: {exc}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            "(decompression bomb guard); downscale it first")
    return im


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """8-bit L/RGB, or a float 'F' image for 16-bit/float sources (kept for precision)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" else max(1.0, float(np.nanmax(arr)) if arr.size else 1.0)
        arr = np.clip(np.nan_to_num(arr, nan=0.0) / top, 0.0, 1.0).astype(np.float32)
        return Image.fromarray(arr, mode="F")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def image_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone; the same refusals as `decode_image`'s first step.

    Lets a server bound the pixels of a whole batch before decoding any of it.
    """
    return _open(data, max_pixels).size


def decode_image(data: bytes, *, channels: int, height: int, width: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to float32 [channels, height, width] in [0, 1].

    Raises ImageError (a ValueError) for anything that is not a usable image: non-image bytes,
    truncated or corrupt files, images over `max_pixels`, unsupported channel counts.
    """
    if channels not in (1, 3):
        raise ImageError(f"only 1- or 3-channel models are supported, not {channels}")
    if height <= 0 or width <= 0:
        raise ImageError(f"invalid target size {height}x{width}")
    im = _open(data, max_pixels)
    try:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im) or im
        im = _to_mode(im, channels)
        if im.size != (width, height):
            im = im.resize((width, height), RESAMPLE)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression bomb guard): {exc}") from None
    except MemoryError:
        raise ImageError("image too large to decode in memory") from None
    except Exception as exc:  # truncated data, bad chunks, CRC errors, zlib errors, ...
        raise ImageError(f"corrupt or truncated image ({im.format or 'unknown'}): {exc}") from None
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = np.clip(arr, 0.0, 1.0)
        arr = arr[None] if channels == 1 else np.repeat(arr[None], 3, axis=0)
    else:
        arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def decode_b64_image(text: str, *, channels: int, height: int, width: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode_image(decode_b64(text), ...)`: the wire format straight to the model's array."""
    return decode_image(decode_b64(text), channels=channels, height=height, width=width,
                        max_pixels=max_pixels)
