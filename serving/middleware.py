"""The HTTP front's ASGI middleware: body cap, JSON only, readable validation errors; and the
ASGI types and small helpers (answer an error, replay a read body) that uploads.py and
openapi.py share.

BentoML 1.4 has no body-size setting. `BodySizeLimit` answers 413 {"error": ...} to a body over
the cap before the application parses anything. With a Content-Length the check is immediate; a
chunked body (no Content-Length) is buffered up to the cap and replayed, so the application never
sees more than `max_bytes`. An oversized body is drained (up to a bound) before answering, so a
client that first sends its whole body still reads the 413 instead of a reset connection.

`JsonOnly` answers 415 to other media types (BentoML would otherwise also parse multipart and
pickle bodies); the uploads POST /classify accepts are turned into JSON before it by uploads.py.
`ReadableValidationErrors` rewrites BentoML's pydantic 400 body
{"error": "1 validation error for X", "detail": [...]} so that "error" names each field and
problem ("solver: Input should be 'naive', 'anderson' or 'broyden'"); "detail" is kept. When
every error concerns a field of the schema's `UNPROCESSABLE_FIELDS` the status becomes 422: a
well-formed request asking for something this service cannot honour (a `coverage` of 0, below 0,
over 1, NaN or a string), which a client must be able to tell apart from a malformed request.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from .schema import UNPROCESSABLE_FIELDS

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DRAIN_FACTOR = 8  # read (and drop) at most this many times the cap before answering 413


class BodySizeLimit:
    """Answer 413 to POST/PUT/PATCH bodies over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 methods: tuple[str, ...] = ("POST", "PUT", "PATCH")):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.methods = methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in self.methods:
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length == -1:
            await reply_error(send, 400, "invalid Content-Length header")
            return
        if length is not None:
            if length > self.max_bytes:
                await self._drain(receive, length)
                await self._too_large(send, length)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): buffer up to the cap, then replay to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if msg.get("more_body", False):
                    await self._drain(receive, None, already=size)
                await self._too_large(send, size, at_least=True)
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _drain(self, receive: Receive, length: int | None, already: int = 0) -> None:
        bound = _DRAIN_FACTOR * self.max_bytes
        if length is not None and length > bound:
            return
        seen = already
        while seen <= bound:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def _too_large(self, send: Send, size: int, at_least: bool = False) -> None:
        over = "over" if not at_least else "at least, over"
        await reply_error(send, 413, f"request body is {size} bytes ({over} the limit of "
                                     f"{self.max_bytes} bytes, DEQGUARD_MAX_BODY_BYTES); send "
                                     "fewer or smaller images per request")


def _content_length(scope: Scope) -> int | None:
    """The declared length, None when absent, -1 when unparseable."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


def replay_body(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def reply_error(send: Send, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class JsonOnly:
    """415 for POST bodies that are not JSON (the wire contract is JSON only)."""

    def __init__(self, app: ASGIApp, methods: tuple[str, ...] = ("POST", "PUT", "PATCH")):
        self.app = app
        self.methods = methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in self.methods:
            ctype = request_header(scope, b"content-type")
            media = ctype.split(";")[0].strip().lower() if ctype is not None else ""
            if media not in ("", "application/json"):
                hint = (" (or upload the image: multipart/form-data with a file field 'image', "
                        "or a raw image/* body)" if scope.get("path") == "/classify" else "")
                await reply_error(send, 415, f"unsupported media type {media!r}: send a JSON "
                                             f"body with Content-Type: application/json{hint}")
                return
        await self.app(scope, receive, send)


class ReadableValidationErrors:
    """Give BentoML's validation 400s an "error" string that names the fields at fault."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def wrapped(msg: Message) -> None:
            nonlocal held
            if msg["type"] == "http.response.start" and msg["status"] == 400:
                held = msg
                return
            if held is not None and msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if msg.get("more_body", False):
                    return
                body, status = _readable(b"".join(chunks))
                headers = [(k, v) for k, v in held.get("headers", [])
                           if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**held, "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(msg)

        await self.app(scope, receive, wrapped)


def _readable(body: bytes) -> tuple[bytes, int]:
    """(the rewritten body, its status: 400, or 422 for errors on UNPROCESSABLE_FIELDS only)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body, 400
    if not isinstance(data, dict) or not isinstance(data.get("detail"), list):
        return body, 400
    parts, fields = [], set()
    for d in data["detail"]:
        if not isinstance(d, dict):
            continue
        path = [str(p) for p in d.get("loc", []) if p != "__root__"]
        fields.add(path[0] if path else "")
        parts.append(f"{'.'.join(path) or 'body'}: {d.get('msg', 'invalid')}")
    if parts:
        data["error"] = "invalid request: " + "; ".join(parts)
    status = 422 if fields and fields <= UNPROCESSABLE_FIELDS else 400
    return json.dumps(data).encode(), status


def request_header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
