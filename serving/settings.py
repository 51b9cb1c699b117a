"""Server settings from environment variables and BentoML template arguments, validated once.

The service and its model runner read the same settings, and `deqguard serve` checks them before
BentoML starts. Precedence: a template argument
(`bentoml serve ... --arg checkpoint=path`) over an environment variable over the default.

| setting          | env                         | --arg          | default                        |
|------------------|-----------------------------|----------------|--------------------------------|
| checkpoint       | DEQGUARD_CHECKPOINT         | checkpoint     | default (the shipped model)    |
| backend          | DEQGUARD_BACKEND            | backend        | torch (or onnx)                |
| onnx_path        | DEQGUARD_ONNX               | onnx           | none: export at start-up       |
| onnx_iterations  | DEQGUARD_ONNX_ITERATIONS    | onnx_iterations| the checkpoint's max_iter      |
| onnx_exporter    | DEQGUARD_ONNX_EXPORTER      | onnx_exporter  | auto (dynamo, else TorchScript)|
| device           | DEQGUARD_DEVICE             | device         | auto (CUDA when present)       |
| threads          | DEQGUARD_THREADS            | threads        | 1 (torch/ORT intra-op threads) |
| batch_invariant  | DEQGUARD_BATCH_INVARIANT    | batch_invariant| true (lone samples as pairs)   |
| max_iter_cap     | DEQGUARD_MAX_ITER_CAP       | max_iter_cap   | 100                            |
| max_body_bytes   | DEQGUARD_MAX_BODY_BYTES     | max_body_bytes | 8 MiB (413 above)              |
| max_batch        | DEQGUARD_MAX_BATCH          | max_batch      | 256 images per request         |
| max_pixels       | DEQGUARD_MAX_PIXELS         | max_pixels     | 4096*4096 per image            |
| max_request_pixels | DEQGUARD_MAX_REQUEST_PIXELS | (same) | 64 Mpx per request |
| request_budget_ms | DEQGUARD_REQUEST_BUDGET_MS | (same) | off (1 to 600000 ms) |

`request_budget_ms` is the server's deadline for every request, counted from its arrival: a
request without deadline_ms gets it, a larger deadline_ms is cut to it, and an answer it cut says
stopped="budget" (a selective one abstains). It stops what a deadline can stop: the torch
backend's plain solve; the entropy-reduction defense and the ONNX graph run their fixed
iterations, bounded by max_iter_cap. Off by default: a time limit makes answers depend on load
and hardware, and without it a request's cost is still bounded by max_iter_cap x max_batch.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .images import DEFAULT_MAX_PIXELS

ENV_PREFIX = "DEQGUARD_"


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    checkpoint: str = "default"
    backend: Literal["torch", "onnx"] = "torch"
    onnx_path: str | None = None
    onnx_iterations: int | None = Field(None, ge=1, le=1000)
    onnx_exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=1, le=256)
    batch_invariant: bool = True
    max_iter_cap: int = Field(100, ge=1, le=1000)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_batch: int = Field(256, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=64)
    max_request_pixels: int = Field(64 * 1024 * 1024, ge=64)
    request_budget_ms: int | None = Field(None, ge=1, le=600_000)


_ARG_ALIASES = {"onnx": "onnx_path"}
_ENV_NAMES = {"onnx_path": "DEQGUARD_ONNX"}


def _template_arguments() -> dict[str, Any]:
    """`bentoml serve --arg k=v` values; empty outside a BentoML server."""
    try:
        import bentoml

        return dict(vars(bentoml.use_arguments()))
    except Exception:  # not under bentoml, or an older bentoml without template arguments
        return {}


def load_settings(overrides: dict[str, Any] | None = None) -> ServerSettings:
    """Settings from env and template arguments; `overrides` (tests, bench) win over both."""
    values: dict[str, Any] = {}
    for name in ServerSettings.model_fields:
        env = _ENV_NAMES.get(name, ENV_PREFIX + name.upper())
        if os.environ.get(env):
            values[name] = os.environ[env]
    for key, value in _template_arguments().items():
        values[_ARG_ALIASES.get(key, key)] = value
    values.update(overrides or {})
    return ServerSettings.model_validate(values)


def settings_problem(overrides: dict[str, Any] | None = None) -> str | None:
    """Why the settings `load_settings(overrides)` would read are unusable, in one line naming
    the first bad one as it is set, or None: `deqguard serve` refuses them before BentoML starts,
    whose traceback would name neither the variable nor the range."""
    try:
        load_settings(overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        env = _ENV_NAMES.get(name, ENV_PREFIX + name.upper())
        return f"server setting {name} (${env}): {err['msg']}, got {err.get('input')!r}"
    return None
