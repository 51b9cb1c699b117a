"""The deqguard HTTP service: `bentoml serve deqguard.serving.service:DEQGuard`.

One BentoML service, one process: `DEQGuard` validates and decodes requests (4xx for anything
wrong), resolves their options, and hands per-image items to the model in the same process
(runner.py), whose micro-batcher (batcher.py) runs everything queued while the model was busy as
one call on a dedicated compute thread, one sub-batch per distinct set of options, answers per
item. BentoML stays the HTTP framework: routes, validation, middleware, /livez /readyz
/metrics, `bentoml serve` and `bentoml build`.

Why not BentoML's own adaptive batching (a second service with a batchable API, as before):
measured on the anchor CNN (bench/serve.py --ladder, docs/eval/wk/default/bench/), the hop to
that service (pickle, aiohttp, uvicorn, its dispatcher) took about 11 ms of a 24 ms request at
c=1 around a 2 ms model call; under load its dispatcher sent batches of 1.4 images on average,
and its pooled connections went stale (uvicorn closes them after 5 s idle, aiohttp keeps them
15 s), so the front had to resend. In-process, a request costs the front's work plus the model.

Model logic lives in engine.py / onnx_engine.py (chosen in factory.py); settings (env or
`--arg`) in settings.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .middleware import BodySizeLimit, JsonOnly, ReadableValidationErrors
from .openapi import OpenAPIDocument
from .options import OptionsError
from .runner import Item, ModelRunner
from .schema import (
    ClassifyBatchRequest,
    ClassifyRequest,
    ClassifyResult,
    ClassifyTensorRequest,
)
from .settings import load_settings
from .store import declared_model
from .ui import UI_PATH, page_routes
from .uploads import Uploads
from .validation import RequestError, decode_images, options_of, tensor_array

log = logging.getLogger("deqguard.serving")
SETTINGS = load_settings()
_INLINE_DECODE_CHARS = 64 * 1024


class _RunningFront:
    """The running `DEQGuard` instance, for the plain Starlette routes mounted beside it."""

    service: DEQGuard | None = None


async def _get_model(request: Request) -> JSONResponse:
    front = _RunningFront.service
    if front is None:
        return JSONResponse({"error": "service is starting"}, status_code=503)
    return JSONResponse(await front.description())


_META_APP = Starlette(routes=[Route("/model", _get_model, methods=["GET"]), *page_routes()])


def public_url(runner_map: str | None = None) -> str | None:
    """This server's address as BentoML tells its workers (BENTOML_RUNNER_MAP: service name ->
    URL, `localhost` for a server on 0.0.0.0), or None outside `bentoml serve`."""
    raw = os.environ.get("BENTOML_RUNNER_MAP") if runner_map is None else runner_map
    try:
        url = json.loads(raw or "{}").get("deqguard")
    except (ValueError, AttributeError):
        return None
    return url.rstrip("/") if isinstance(url, str) and url else None


def ready_line(url: str) -> str:
    """What the server prints once it answers: where the demo page is (ASCII: a worker's
    stdout may not take anything else)."""
    return f"deqguard: serving on {url} - open {url}{UI_PATH}"


@bentoml.service(name="deqguard", workers=1, traffic={"timeout": 300})
@bentoml.asgi_app(_META_APP, path="/")
class DEQGuard:
    """POST /classify (JSON, multipart or raw image), /classify_batch, /classify_tensor;
    GET /model, /ui (the web page; / redirects there), /docs (the API page), /docs.json;
    /livez /readyz /metrics."""

    # A model-store tag is declared as BentoML documents it, so `bentoml build` packs the model
    # into the Bento; None (not a model) for a path or `default`. See store.py.
    checkpoint_model = declared_model(SETTINGS.checkpoint)

    def __init__(self) -> None:
        from . import metrics
        from .factory import load_engine

        engine = load_engine(SETTINGS)  # fails fast on a missing or broken checkpoint
        metrics.declare(engine.backend, engine.solvers(), engine.defenses())
        self.engine = engine
        self._description = engine.describe()
        self._spec: dict[str, Any] = self._description["input"]
        self.model = ModelRunner(engine, threads=SETTINGS.threads)  # warms up on its thread
        self._announcer: asyncio.Task[None] | None = None
        _RunningFront.service = self

    @bentoml.on_deployment
    def preflight() -> None:
        """Once, before any worker starts: refuse to serve an unusable checkpoint (a worker that
        fails in __init__ is restarted forever, so the error would only scroll by in the log)."""
        from deqguard.models import CheckpointError, load_checkpoint

        s = load_settings()
        if s.backend == "onnx" and s.onnx_path:
            if not os.path.isfile(s.onnx_path):
                raise CheckpointError(f"ONNX graph not found: {s.onnx_path} (DEQGUARD_ONNX)")
            return
        from deqguard.models.learned_detector import detector_from_metadata
        from deqguard.models.selective import selective_from_metadata

        try:
            # The full load, tensor hash included: a tampered file refused inside a worker
            # would only make BentoML restart that worker forever. The same holds for metadata
            # blocks the engine reads (a detector or selective calibration for other weights).
            _, meta = load_checkpoint(s.checkpoint, device="cpu")
            detector_from_metadata(meta)
            selective_from_metadata(meta)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}. Choose the checkpoint with DEQGUARD_CHECKPOINT=<path or name:version> or "
                "`--arg checkpoint=...`; the shipped `default` comes with a trained "
                "release") from None

    def __is_ready__(self) -> bool:
        return self.model.ready

    def __is_alive__(self) -> bool:  # a failed warm-up: /readyz and /livez answer 503
        return self.model.failed is None

    @bentoml.on_startup
    async def announce_when_ready(self) -> None:
        """Print where the page is once the model is ready: BentoML's own start-up line comes
        before anything answers and does not name the page; this one comes when opening the
        page works."""
        url = public_url()
        if url is not None:
            self._announcer = asyncio.get_running_loop().create_task(self._announce(url))

    async def _announce(self, url: str) -> None:
        while not self.model.ready:
            await asyncio.sleep(0.2)
        print(ready_line(url), flush=True)

    @bentoml.on_shutdown
    def stop_model(self) -> None:
        self.model.close()

    async def description(self) -> dict[str, Any]:
        return self._description

    async def _run(self, x: Any, request: Any, arrived: float) -> list[dict[str, Any]]:
        """Per-image items to the micro-batched model (runner.py); its answers are
        ClassifyResult dicts already (built by the engine from the schema), returned as they
        are. Options are resolved here, so a refused one is a 422 that never reaches a batch."""
        try:
            opts = self.engine.resolve(**options_of(request))
        except OptionsError as exc:
            raise RequestError(422, str(exc)) from None
        # The deadline counts from the request's arrival (the model's queue too).
        deadline_at = (arrived + request.deadline_ms / 1000.0
                       if request.deadline_ms is not None else None)
        # The server's compute budget, a deadline of its own: it is no option of the request,
        # so a selective request is not refused for it (its cut answers abstain instead).
        budget = SETTINGS.request_budget_ms
        budget_at = arrived + budget / 1000.0 if budget is not None else None
        return await self.model.answer(
            [Item(xi, opts, bool(request.trajectory), deadline_at, budget_at) for xi in x])

    async def _images(self, images: list[str]) -> Any:
        s = SETTINGS
        decode = functools.partial(decode_images, images, self._spec, max_batch=s.max_batch,
                                   max_pixels=s.max_pixels,
                                   max_request_pixels=s.max_request_pixels)
        if sum(len(t) for t in images) <= _INLINE_DECODE_CHARS:
            return decode()  # small images decode in microseconds: no thread hop
        return await asyncio.to_thread(decode)

    @bentoml.api(route="/classify", input_spec=ClassifyRequest)
    async def classify(self, **fields: Any) -> ClassifyResult:
        """One base64 image -> its prediction, trajectories and detection flag."""
        arrived = time.time()
        req = ClassifyRequest.model_construct(**fields)
        try:
            return JSONResponse(
                (await self._run(await self._images([req.image]), req, arrived))[0])
        except RequestError as exc:
            return _error(exc)

    @bentoml.api(route="/classify_batch", input_spec=ClassifyBatchRequest)
    async def classify_batch(self, **fields: Any) -> list[ClassifyResult]:
        """Several base64 images, one set of options -> answers in the same order."""
        arrived = time.time()
        req = ClassifyBatchRequest.model_construct(**fields)
        try:
            return JSONResponse(await self._run(await self._images(req.images), req, arrived))
        except RequestError as exc:
            return _error(exc)

    @bentoml.api(route="/classify_tensor", input_spec=ClassifyTensorRequest)
    async def classify_tensor(self, **fields: Any) -> list[ClassifyResult]:
        """float32 values in [0, 1] as nested lists [N, C, H, W] -> one answer per row."""
        arrived = time.time()
        req = ClassifyTensorRequest.model_construct(**fields)
        try:
            x = await asyncio.to_thread(tensor_array, req.tensor, self._spec,
                                        max_batch=SETTINGS.max_batch)
            return JSONResponse(await self._run(x, req, arrived))
        except RequestError as exc:
            return _error(exc)


def _error(exc: RequestError) -> Any:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


# Added in order, so the first is the outermost. The body cap applies to uploads as sent; uploads
# become JSON before the JSON-only check.
DEQGuard.add_asgi_middleware(ReadableValidationErrors)
DEQGuard.add_asgi_middleware(OpenAPIDocument)
DEQGuard.add_asgi_middleware(BodySizeLimit, max_bytes=SETTINGS.max_body_bytes)
DEQGuard.add_asgi_middleware(Uploads)
DEQGuard.add_asgi_middleware(JsonOnly)
