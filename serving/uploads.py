"""Image uploads for POST /classify: multipart/form-data and raw image bodies, as JSON requests.

The two ways people send an image with curl:

    curl -F image=@shirt.png -F max_iter=20 URL/classify
    curl -H 'Content-Type: image/png' --data-binary @shirt.png 'URL/classify?max_iter=20'

are rewritten here, before BentoML parses anything, into the JSON request of the wire contract
({"image": base64, "max_iter": "20", ...}). Form fields and query parameters keep their names and
travel as strings (pydantic's JSON validation accepts "20" for an int and "false" for a bool), so
every rule of the JSON route applies unchanged: unknown fields and bad values are 400s naming the
field, non-images and truncated files 400s, bombs 400, and the body cap (413) has already been
applied to the upload itself by `middleware.BodySizeLimit`, which wraps this middleware.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from .images import encode_b64
from .middleware import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    replay_body,
    reply_error,
    request_header,
)

UPLOAD_ROUTES = ("/classify",)
IMAGE_FIELD = "image"
_MAX_FORM_FIELDS = 32  # the options are a handful; a form with more is not ours


class UploadError(ValueError):
    """A multipart body this route cannot use (the message says why)."""


def media_type(scope: Scope) -> str:
    ctype = request_header(scope, b"content-type")
    return ctype.split(";")[0].strip().lower() if ctype is not None else ""


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def is_upload(path: str, media: str) -> bool:
    return path in UPLOAD_ROUTES and (media in FORM_TYPES or media.startswith("image/"))


async def read_body(receive: Receive) -> bytes:
    """The whole request body (already capped by BodySizeLimit, which wraps this middleware)."""
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def raw_request(body: bytes, query: str) -> dict[str, Any]:
    """A raw image body and its query string -> the JSON request's fields."""
    fields = _unique(parse_qsl(query, keep_blank_values=True), "query parameter")
    if IMAGE_FIELD in fields:
        raise UploadError("the image is the request body; do not also pass image= in the query")
    return {IMAGE_FIELD: encode_b64(body), **fields}


async def form_request(scope: Scope, body: bytes) -> dict[str, Any]:
    """A form body -> the JSON request's fields: multipart with the file field `image`; a
    urlencoded form (no files) may carry `image` as base64 text like the JSON field."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    request = Request(scope, replay_body(body, _no_more))
    try:
        form = await request.form(max_files=1, max_fields=_MAX_FORM_FIELDS)
    except MultiPartException as exc:
        raise UploadError(f"invalid multipart body: {exc.message}") from None
    except Exception as exc:  # starlette's HTTPException (limits), python-multipart's errors
        detail = getattr(exc, "detail", None) or str(exc)
        raise UploadError(f"invalid multipart body: {detail} (send one image per request, as "
                          f"the file field {IMAGE_FIELD!r})") from None
    try:
        items: list[tuple[str, str]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != IMAGE_FIELD:
                    raise UploadError(f"unexpected file field {name!r}: send the image as the "
                                      f"file field {IMAGE_FIELD!r}")
                items.append((name, encode_b64(await value.read())))
            else:
                items.append((name, value))
        return _unique(items, "form field")
    finally:
        await form.close()


def _unique(items: list[tuple[str, str]], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        if name in out:
            raise UploadError(f"{what} {name!r} given more than once")
        out[name] = value
    return out


async def _no_more() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class Uploads:
    """Rewrite multipart and image/* POSTs to UPLOAD_ROUTES into JSON requests."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        media = media_type(scope)
        if not is_upload(scope.get("path", ""), media):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        try:
            if media in FORM_TYPES:
                fields = await form_request(scope, body)
            else:
                fields = raw_request(body, scope.get("query_string", b"").decode("latin-1"))
        except UploadError as exc:
            await reply_error(send, 400, str(exc))
            return
        payload = json.dumps(fields).encode()
        headers = [(k, v) for k, v in scope.get("headers", [])
                   if k not in (b"content-type", b"content-length", b"transfer-encoding")]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())]
        inner = {**scope, "headers": headers, "query_string": b""}
        await self.app(inner, replay_body(payload, receive), send)
