"""Request bodies -> model-ready arrays, or a RequestError carrying the 4xx to answer.

Everything a client can get wrong is caught here, in the HTTP handler, before anything reaches the
batched model: one bad request must never fail the batch it would have shared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .images import ImageError, decode_b64, decode_image, image_size
from .schema import SOLVE_OPTION_FIELDS


class RequestError(Exception):
    """A client error: `status` (4xx) and a message the client can act on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def options_of(request: Any) -> dict[str, Any]:
    """The solve options of a ClassifyOptions request (the keyword arguments of the engine's
    `resolve`)."""
    return {name: getattr(request, name) for name in SOLVE_OPTION_FIELDS}


def check_count(n: int, max_batch: int, what: str = "images") -> None:
    if n == 0:
        raise RequestError(400, f"empty batch: send at least one of {what}")
    if n > max_batch:
        raise RequestError(413, f"{n} {what} in one request, over the batch cap of {max_batch} "
                                "(DEQGUARD_MAX_BATCH); split the request")


def decode_images(images: list[str], spec: dict[str, Any], *, max_batch: int, max_pixels: int,
                  max_request_pixels: int) -> np.ndarray:
    """Base64 images -> float32 [N, C, H, W] in [0, 1] (serving.images' preprocessing)."""
    check_count(len(images), max_batch)
    where = (lambda i: f"image {i}: ") if len(images) > 1 else (lambda i: "")
    raw: list[bytes] = []
    total = 0
    for i, text in enumerate(images):
        try:
            data = decode_b64(text)
            w, h = image_size(data, max_pixels=max_pixels)
        except ImageError as exc:
            raise RequestError(400, where(i) + str(exc)) from None
        total += w * h
        if total > max_request_pixels:
            raise RequestError(413, f"the images of this request hold over {max_request_pixels} "
                                    "pixels together (DEQGUARD_MAX_REQUEST_PIXELS); send fewer "
                                    "or smaller images")
        raw.append(data)
    out = np.empty((len(raw), spec["channels"], spec["height"], spec["width"]), np.float32)
    for i, data in enumerate(raw):
        try:
            out[i] = decode_image(data, channels=spec["channels"], height=spec["height"],
                                  width=spec["width"], max_pixels=max_pixels)
        except ImageError as exc:
            raise RequestError(400, where(i) + str(exc)) from None
    return out


def tensor_array(tensor: Any, spec: dict[str, Any], *, max_batch: int) -> np.ndarray:
    """Nested lists [N, C, H, W] of numbers in [0, 1] -> float32 array, or a 400 saying why."""
    want = (spec["channels"], spec["height"], spec["width"])
    shape_text = f"[N, {want[0]}, {want[1]}, {want[2]}]"
    try:
        arr = np.asarray(tensor)
    except (ValueError, TypeError):
        raise RequestError(400, f"tensor must be a rectangular nested list of numbers of shape "
                                f"{shape_text}; got a ragged list") from None
    if arr.dtype.kind not in "fiu":
        kind = "booleans" if arr.dtype.kind == "b" else f"values of type {arr.dtype}"
        raise RequestError(400, f"tensor must hold numbers (float32 values in [0, 1]), got "
                                f"{kind}")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
        raise RequestError(400, f"tensor must have shape {shape_text}, got {list(arr.shape)}")
    check_count(arr.shape[0], max_batch, "tensors")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise RequestError(400, "tensor contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise RequestError(400, f"tensor values must be in [0, 1] (float32 pixels), got "
                                f"min {lo:g}, max {hi:g}")
    return arr
