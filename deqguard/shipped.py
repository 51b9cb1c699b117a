"""The checkpoints shipped inside the package, by the names every command accepts for them.

Written once, here and torch-free, because the CLIs' help text names them before any model code
(and torch) is imported; `deqguard.models.checkpoint` maps each to its file under
models/weights/.
"""

from __future__ import annotations

# name -> file in models/weights/. `regulated-e15` is the default shipped until 2026-12-05 (the
# 15-epoch regulated DEQ): kept by name so that a caller who needs the answers served before the
# switch can still serve them.
SHIPPED_CHECKPOINTS: dict[str, str] = {
    "default": "default.safetensors",
    "regulated-e15": "regulated-e15.safetensors",
}
# How help and error texts list them: "default, regulated-e15".
SHIPPED_NAMES = ", ".join(SHIPPED_CHECKPOINTS)
