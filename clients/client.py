"""Python clients for the deqguard HTTP service (sync and asyncio), with retries and typed answers.

The wire contract is `deqguard.serving.schema`, imported rather than restated, so the client and
the server cannot drift apart. Only failures that another try can fix are retried: connection
errors and 503 (the server is starting or shedding load). A 4xx means the request itself is wrong
and raises `ServerError` at once, carrying the server's message.

    from deqguard.clients import Client
    with Client("http://127.0.0.1:3000") as client:
        result = client.classify("shirt.png", max_iter=20)
        result.class_name, result.entropy, result.detection.suspicious
        sure = client.classify("shirt.png", coverage=0.9)   # selective: answer ~90% of clean inputs
        sure.abstained, sure.selective.score, sure.selective.threshold
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
from pydantic import ValidationError

from deqguard.errors import DeqguardError
from deqguard.serving.schema import ClassifyOptions, ClassifyResult

from .encode import ImageInput, image_b64

DEFAULT_URL = "http://127.0.0.1:3000"
RETRY_STATUSES = frozenset({503})
# Failures before the server could answer: another try may well succeed. A read timeout is not
# here on purpose: the server may still be working on the request, and a retry doubles its load.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class ClientError(DeqguardError):
    """A request the client could not get a usable answer for; `status` is None without one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.message = message
        self.status = status


class ServerError(ClientError):
    """The server answered with an error status; `message` is its {"error": ...} text."""


class ConnectionFailed(ClientError):
    """No answer from the server after every retry (refused, reset, DNS, connect timeout)."""


def request_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate per-request options against the contract before anything is sent.

    Only the options the caller set are sent, so the server's checkpoint defaults apply to the
    rest. A typo (`max_iters=`) fails here with pydantic's message instead of as a 4xx.
    """
    try:
        return ClassifyOptions.model_validate(options).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise ValueError(f"invalid classify options: {exc}") from None


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return resp.text.strip()


def _answer(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        raise ServerError(_error_message(resp), resp.status_code)
    return resp.json()


class _Retrying:
    """The retry policy shared by both clients: exponential backoff with a little jitter."""

    def __init__(self, retries: int, backoff: float, max_backoff: float):
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must be >= 0")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff

    def delay(self, attempt: int, resp: httpx.Response | None = None) -> float:
        retry_after = resp.headers.get("retry-after") if resp is not None else None
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff)
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        base = min(self.backoff * 2 ** attempt, self.max_backoff)
        return base * (1.0 + 0.25 * random.random())

    @staticmethod
    def give_up(exc: Exception, url: str) -> ConnectionFailed:
        return ConnectionFailed(f"no answer from {url}: {type(exc).__name__}: {exc}")


def _failed(exc: Exception, url: str) -> ClientError:
    return ClientError(f"request to {url} failed: {type(exc).__name__}: {exc}")


def _tensor_payload(array: Any, options: dict[str, Any]) -> dict[str, Any]:
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 3:
        a = a[None]
    return {"tensor": a.tolist(), **options}


class Client:
    """Blocking client; safe to share between threads (one connection pool)."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.25, max_backoff: float = 8.0,
                 headers: dict[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self._retry = _Retrying(retries, backoff, max_backoff)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers,
                                  transport=transport)

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, json: Any = None) -> Any:
        for attempt in range(self._retry.retries + 1):
            last = attempt == self._retry.retries
            try:
                resp = self._http.request(method, path, json=json)
            except RETRY_EXCEPTIONS as exc:
                if last:
                    raise self._retry.give_up(exc, self.url) from exc
                time.sleep(self._retry.delay(attempt))
                continue
            except httpx.HTTPError as exc:  # read/write/pool timeouts: not retried
                raise _failed(exc, self.url) from exc
            if resp.status_code in RETRY_STATUSES and not last:
                time.sleep(self._retry.delay(attempt, resp))
                continue
            return _answer(resp)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API ----------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether the server answers /readyz with 200 (model loaded and warmed up); no retries."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def model_info(self) -> dict[str, Any]:
        """The served checkpoint's metadata: classes, input spec, metrics, detection, sha256."""
        return self._request("GET", "/model")

    def classify(self, image: ImageInput, **options: Any) -> ClassifyResult:
        """One image; options are `ClassifyOptions` fields (max_iter, tol, solver, defense...).

        `coverage=c` (0 < c <= 1) asks for selective answering: `abstained` is true when the
        checkpoint's doubt score is over the threshold calibrated to answer a share c of clean
        inputs (the prediction is still given); a checkpoint without that calibration refuses
        c < 1 with a ServerError (422).
        """
        opts = request_options(options)
        return ClassifyResult.model_validate(
            self._request("POST", "/classify", {"image": image_b64(image), **opts}))

    def classify_batch(self, images: Sequence[ImageInput], **options: Any) -> list[ClassifyResult]:
        """Several images in one request (all-or-nothing: one bad image fails the request)."""
        opts = request_options(options)
        body = {"images": [image_b64(im) for im in images], **opts}
        return [ClassifyResult.model_validate(r)
                for r in self._request("POST", "/classify_batch", body)]

    def classify_tensor(self, array: Any, **options: Any) -> list[ClassifyResult]:
        """Float32 values in [0, 1] shaped [N, C, H, W] (or one [C, H, W]), no image codec."""
        opts = request_options(options)
        return [ClassifyResult.model_validate(r)
                for r in self._request("POST", "/classify_tensor", _tensor_payload(array, opts))]

    def classify_many(self, images: Iterable[ImageInput], *, concurrency: int = 8,
                      return_exceptions: bool = False, **options: Any
                      ) -> list[ClassifyResult | Exception]:
        """Many images as concurrent single requests (the server batches them), order kept.

        With `return_exceptions=True` a failed image gives its exception in its place instead
        of failing the whole call, as `asyncio.gather` does.
        """
        request_options(options)  # fail before sending anything
        items = list(images)
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")

        def one(image: ImageInput) -> ClassifyResult | Exception:
            try:
                return self.classify(image, **options)
            except (ClientError, OSError, ValueError, TypeError) as exc:
                if return_exceptions:
                    return exc
                raise

        with ThreadPoolExecutor(max_workers=min(concurrency, max(len(items), 1))) as pool:
            futures = [pool.submit(one, im) for im in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


class AsyncClient:
    """asyncio client with the same API as `Client` (every call is a coroutine)."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.25, max_backoff: float = 8.0,
                 headers: dict[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/")
        self._retry = _Retrying(retries, backoff, max_backoff)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers,
                                       transport=transport)

    async def _request(self, method: str, path: str, json: Any = None) -> Any:
        for attempt in range(self._retry.retries + 1):
            last = attempt == self._retry.retries
            try:
                resp = await self._http.request(method, path, json=json)
            except RETRY_EXCEPTIONS as exc:
                if last:
                    raise self._retry.give_up(exc, self.url) from exc
                await asyncio.sleep(self._retry.delay(attempt))
                continue
            except httpx.HTTPError as exc:
                raise _failed(exc, self.url) from exc
            if resp.status_code in RETRY_STATUSES and not last:
                await asyncio.sleep(self._retry.delay(attempt, resp))
                continue
            return _answer(resp)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def model_info(self) -> dict[str, Any]:
        return await self._request("GET", "/model")

    async def classify(self, image: ImageInput, **options: Any) -> ClassifyResult:
        opts = request_options(options)
        data = image if isinstance(image, (bytes, bytearray, memoryview)) else None
        b64 = image_b64(data) if data is not None else await asyncio.to_thread(image_b64, image)
        return ClassifyResult.model_validate(
            await self._request("POST", "/classify", {"image": b64, **opts}))

    async def classify_batch(self, images: Sequence[ImageInput], **options: Any
                             ) -> list[ClassifyResult]:
        opts = request_options(options)
        encoded = await asyncio.to_thread(lambda: [image_b64(im) for im in images])
        answer = await self._request("POST", "/classify_batch", {"images": encoded, **opts})
        return [ClassifyResult.model_validate(r) for r in answer]

    async def classify_tensor(self, array: Any, **options: Any) -> list[ClassifyResult]:
        opts = request_options(options)
        answer = await self._request("POST", "/classify_tensor", _tensor_payload(array, opts))
        return [ClassifyResult.model_validate(r) for r in answer]

    async def classify_many(self, images: Iterable[ImageInput], *, concurrency: int = 8,
                            return_exceptions: bool = False, **options: Any
                            ) -> list[ClassifyResult | Exception]:
        request_options(options)
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        gate = asyncio.Semaphore(concurrency)

        async def one(image: ImageInput) -> ClassifyResult | Exception:
            async with gate:
                try:
                    return await self.classify(image, **options)
                except (ClientError, OSError, ValueError, TypeError) as exc:
                    if return_exceptions:
                        return exc
                    raise

        tasks = [asyncio.ensure_future(one(im)) for im in images]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
