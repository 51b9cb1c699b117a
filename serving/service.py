"""The deqguard HTTP service: `bentoml serve deqguard.serving.service:DEQGuard`.

Two BentoML services, the documented pattern for adaptive batching with per-request options:
`DEQGuard`, the HTTP front, validates and decodes requests (4xx for anything wrong) and sends
per-image items to `DEQGuardModel`, whose one batchable API groups concurrent items, runs each
distinct set of options as its own sub-batch and answers per item. Model logic lives in
engine.py / onnx_engine.py (chosen in factory.py); settings (env or `--arg`) in settings.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .middleware import BodySizeLimit, JsonOnly, ReadableValidationErrors
from .openapi import OpenAPIDocument
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
# Items per model call; the front's batch cap (max_batch) may be larger: BentoML splits jobs.
MODEL_BATCH = 64
# High on purpose: BentoML answers 503 when it predicts a batch cannot finish in time, and short
# values shed load under 20 concurrent calls in a trial. Back-pressure comes from the timeout.
MAX_LATENCY_MS = 60_000
_MODEL_RETRIES = 3
_INLINE_DECODE_CHARS = 64 * 1024


# Internal calls only: no access log line per batch item (the front logs each request).
@bentoml.service(name="deqguard-model", workers=1, threads=1, traffic={"timeout": 300},
                 logging={"access": {"enabled": False}})
class DEQGuardModel:
    """The loaded checkpoint behind one batchable API (not exposed to clients)."""

    # A model-store tag is declared as BentoML documents it, so `bentoml build` packs the model
    # into the Bento; None (not a model) for a path or `default`. See store.py.
    checkpoint_model = declared_model(SETTINGS.checkpoint)

    def __init__(self) -> None:
        from . import metrics
        from .factory import load_engine

        self.engine = load_engine(SETTINGS)  # fails fast on a missing or broken checkpoint
        metrics.declare(self.engine.backend, self.engine.solvers(), self.engine.defenses())
        self.failed: BaseException | None = None
        threading.Thread(target=self._warm_up, name="deqguard-warm-up", daemon=True).start()

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

    def _warm_up(self) -> None:
        try:
            self.engine.warm_up()
            log.info("deqguard model warm (%s backend)", self.engine.backend)
        except BaseException as exc:  # keep it visible: /readyz and /livez answer 503
            self.failed = exc
            log.exception("warm-up failed")

    def __is_ready__(self) -> bool:
        return self.engine.ready.is_set()

    def __is_alive__(self) -> bool:
        return self.failed is None

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    @bentoml.api(batchable=True, max_batch_size=MODEL_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """items: {"x": float32 [C, H, W], "options": {...}, "trajectory": bool,
        "deadline_at", "budget_at": time.time() seconds or None (the caller's deadline, the
        server's compute budget)} -> a ClassifyResult dict, or
        {"error": message} for options this server refuses."""
        from . import metrics
        from .options import OptionsError

        self.engine.ready.wait()
        out: list[dict[str, Any]] = [{} for _ in items]
        ok, opts = [], []
        for i, item in enumerate(items):
            try:
                opts.append(self.engine.resolve(**item["options"]))
                ok.append(i)
            except OptionsError as exc:
                out[i] = {"error": str(exc)}
        deadlines = [items[i].get("deadline_at") or float("inf") for i in ok]
        budgets = [items[i].get("budget_at") or float("inf") for i in ok]
        traces = self.engine.classify_grouped([items[i]["x"] for i in ok], opts, deadlines,
                                              budgets)
        done = []
        for i, o, t in zip(ok, opts, traces, strict=True):
            res = self.engine.result(t, o, bool(items[i].get("trajectory", True)))
            out[i] = res.model_dump(mode="json")
            done.append((t, o, res))
        metrics.observe(self.engine.backend, done)
        return out


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

    model = bentoml.depends(DEQGuardModel)

    def __init__(self) -> None:
        self._description: dict[str, Any] | None = None
        self._announcer: asyncio.Task[None] | None = None
        _RunningFront.service = self

    @bentoml.on_startup
    async def announce_when_ready(self) -> None:
        """Print where the page is once the model is ready: BentoML's own start-up line comes
        before anything answers and does not name the page; this one comes when opening the
        page works."""
        url = public_url()
        if url is not None:
            self._announcer = asyncio.get_running_loop().create_task(self._announce(url))

    async def _announce(self, url: str) -> None:
        while True:
            try:
                if await self.model.is_ready(5):
                    break
            except Exception:  # the proxy is set up after start-up hooks; the model may be down
                pass
            await asyncio.sleep(0.5)
        print(ready_line(url), flush=True)

    async def _call_model(self, api: str, *args: Any) -> Any:
        """Call the model service, retrying on a stale pooled connection.

        BentoML 1.4's internal client (aiohttp) keeps idle connections to a dependency for 15 s,
        its uvicorn closes them after 5 s, and a request sent on one fails with "Server
        disconnected" (seen: 6 of 8 requests of a burst after 7 s of sequential traffic).
        The model APIs are pure computations, so resending is safe.
        """
        import aiohttp

        method = getattr(self.model.to_async, api)
        for attempt in range(_MODEL_RETRIES):
            try:
                return await method(*args)
            except aiohttp.ClientConnectionError as exc:
                if attempt == _MODEL_RETRIES - 1:
                    raise
                log.warning("model service connection dropped (%s); resending", exc)

    async def description(self) -> dict[str, Any]:
        if self._description is None:
            self._description = await self._call_model("describe")
        return self._description

    async def _spec(self) -> dict[str, Any]:
        return (await self.description())["input"]

    async def _run(self, x: Any, request: Any, arrived: float) -> list[dict[str, Any]]:
        """Per-image items to the batched model; its answers are ClassifyResult dicts already
        (built by the engine from the schema), so they are returned as they are."""
        opts = options_of(request)
        # The deadline counts from the request's arrival at the front (the model's queue too).
        deadline_at = (arrived + request.deadline_ms / 1000.0
                       if request.deadline_ms is not None else None)
        # The server's compute budget, a deadline of its own: it is no option of the request,
        # so a selective request is not refused for it (its cut answers abstain instead).
        budget = SETTINGS.request_budget_ms
        budget_at = arrived + budget / 1000.0 if budget is not None else None
        items = [{"x": xi, "options": opts, "trajectory": request.trajectory,
                  "deadline_at": deadline_at, "budget_at": budget_at} for xi in x]
        answers = await self._call_model("infer", items)
        errors = [a["error"] for a in answers if "error" in a]
        if errors:
            raise RequestError(422, errors[0])
        return answers

    async def _images(self, images: list[str]) -> Any:
        spec = await self._spec()
        s = SETTINGS
        decode = functools.partial(decode_images, images, spec, max_batch=s.max_batch,
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
            spec = await self._spec()
            x = await asyncio.to_thread(tensor_array, req.tensor, spec,
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
