"""Per-image outcomes as strings of '0' and '1', the form reports keep them in.

A count says how many images a model got right; two models scored on the same images differ on
fewer images than their counts suggest, and only which images each got right tells by how much
(`deqguard compare`: the paired difference). One character per image keeps a 10,000-image report
readable and its JSON small. Only numpy here: comparing reports needs no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_range(start: int, n: int) -> str:
    """Images `start` + 1 to `start` + `n` of a split, numbered from 1 as a reader counts them
    ("1001-2000" for --start 1000 --n 1000)."""
    return f"{start + 1}-{start + n}"


def bits(flags: Sequence[bool] | np.ndarray | object) -> str:
    """'1' where a flag is true; takes a tensor, an array or a list (anything with tolist)."""
    values = flags.tolist() if hasattr(flags, "tolist") else list(flags)  # type: ignore[union-attr]
    return "".join("1" if v else "0" for v in values)


def unbits(s: str) -> np.ndarray:
    """The boolean array `bits` wrote; anything but '0' and '1' is an error, not a zero."""
    if s.strip("01"):
        raise ValueError("a per-image outcome string holds only '0' and '1'")
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")
