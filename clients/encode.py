"""Turn whatever a user holds (a path, bytes, a PIL image, a numpy array) into bytes for the wire.

Files and bytes travel as they are, so the server's decoder sees exactly what the user has; arrays
and PIL images are encoded losslessly as PNG. Torch-free on purpose: the base install has no torch.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import numpy as np
from PIL import Image

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


def array_to_png(array: np.ndarray) -> bytes:
    """PNG bytes of an HW or HWC array, uint8 or float in [0, 1] (rounded to 8 bits)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image array of shape HxW or HxWxC with C in 1, 3, 4, got "
                         f"{list(a.shape)} (a CxHxW array needs np.moveaxis(a, 0, -1))")
    if a.dtype == np.uint8:
        pixels = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("image array contains NaN or infinite values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(f"float image arrays must lie in [0, 1], got [{a.min():.3g}, "
                             f"{a.max():.3g}]; pass uint8 for 0..255 values")
        pixels = np.rint(a * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"expected a uint8 or float image array, got {a.dtype}")
    return pil_to_png(Image.fromarray(np.ascontiguousarray(pixels)))


def pil_to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(image: ImageInput | Any) -> bytes:
    """The encoded bytes of one image input, read or encoded as needed."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as fh:
            return fh.read()
    if isinstance(image, Image.Image):
        return pil_to_png(image)
    if isinstance(image, np.ndarray):
        return array_to_png(image)
    raise TypeError(f"cannot send {type(image).__name__} as an image: pass a path, bytes, "
                    "a PIL image or a numpy array")


def image_b64(image: ImageInput | Any) -> str:
    """The base64 text the wire contract carries for one image."""
    return base64.b64encode(image_bytes(image)).decode("ascii")
