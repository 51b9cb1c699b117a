"""GET /docs.json as a valid OpenAPI 3.0 document, with the upload forms of POST /classify.

BentoML 1.4 declares `openapi: 3.0.2` but embeds pydantic's JSON Schema (draft 2020-12, the
dialect of OpenAPI 3.1): numeric `exclusiveMinimum`, `{"type": "null"}` in `anyOf`, `const`,
`examples` lists. Strict 3.0 tools and client generators reject those. `to_openapi30` rewrites
them into their 3.0 spellings (boolean exclusive bounds, `nullable`, `enum`, `example`);
`add_uploads` documents the multipart and raw-image bodies serving/uploads.py accepts; the
`OpenAPIDocument` middleware applies both to BentoML's answer. tests/test_serving_uploads.py
validates the result with openapi-spec-validator.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .middleware import ASGIApp, Message, Receive, Scope, Send
from .uploads import IMAGE_FIELD, UPLOAD_ROUTES

DOC_PATH = "/docs.json"
_NULL = {"type": "null"}
_ERROR_CODES = {"413": "Request body or batch over the server's caps",
                "415": "Unsupported media type", "422": "Options this server cannot honour"}


def to_openapi30(node: Any) -> Any:
    """A copy of `node` with JSON Schema 2020-12 keywords rewritten to OpenAPI 3.0's."""
    if isinstance(node, list):
        return [to_openapi30(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_openapi30(v) for k, v in node.items()}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        v = out.get(exclusive)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[bound], out[exclusive] = v, True
    for comb in ("anyOf", "oneOf"):
        options = out.get(comb)
        if isinstance(options, list) and _NULL in options:
            rest = [o for o in options if o != _NULL]
            del out[comb]
            out["nullable"] = True
            if len(rest) == 1 and "$ref" in rest[0]:
                out["allOf"] = rest  # 3.0 ignores siblings of $ref: wrap it
            elif len(rest) == 1:
                out = {**rest[0], **{k: v for k, v in out.items() if k not in rest[0]}}
            elif rest:
                out[comb] = rest
    kind = out.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) < len(kind):
            out["nullable"] = True
        out["type"] = kinds[0] if len(kinds) == 1 else kinds
    if kind == "null":
        del out["type"]
        out["nullable"] = True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if isinstance(out.get("examples"), list):
        examples = out.pop("examples")
        if examples:
            out["example"] = examples[0]
    if "default" in out and out["default"] is None and "type" in out:
        out["nullable"] = True
    return out


def add_uploads(doc: dict[str, Any]) -> dict[str, Any]:
    """Document the multipart and image/* bodies of UPLOAD_ROUTES, and the 413/415/422 errors."""
    doc = copy.deepcopy(doc)
    error_ref = None
    schemas = doc.get("components", {}).get("schemas", {})
    if "InvalidArgument" in schemas:
        error_ref = {"$ref": "#/components/schemas/InvalidArgument"}
    for path, item in doc.get("paths", {}).items():
        post = item.get("post")
        if not post:
            continue
        for code, text in _ERROR_CODES.items():
            post.setdefault("responses", {}).setdefault(code, {
                "description": text,
                "content": {"application/json": {"schema": error_ref or {"type": "object"}}}})
        if path not in UPLOAD_ROUTES:
            continue
        content = post.get("requestBody", {}).get("content", {})
        schema = content.get("application/json", {}).get("schema", {})
        options = {k: v for k, v in schema.get("properties", {}).items() if k != IMAGE_FIELD}
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": [IMAGE_FIELD], "additionalProperties": False,
            "properties": {IMAGE_FIELD: {"type": "string", "format": "binary",
                                         "description": "the image file (PNG, JPEG, WebP, ...)"},
                           **copy.deepcopy(options)}}}
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
        params = post.setdefault("parameters", [])
        for name, prop in options.items():
            params.append({"name": name, "in": "query", "required": False,
                           "description": "with a raw image/* body only: "
                                          + prop.get("description", name),
                           "schema": {k: v for k, v in prop.items()
                                      if k not in ("title", "description")}})
        post["description"] = (post.get("description") or "") + (
            "\n\nThe image may also be uploaded as multipart/form-data (file field `image`, "
            "options as form fields) or sent as the raw body (Content-Type image/png, "
            "image/jpeg, ...; options as query parameters).")
    return doc


def describe_errors_and_inputs(doc: dict[str, Any]) -> dict[str, Any]:
    """Say what the server really answers and accepts: a 400's `detail` is pydantic's list of
    errors (BentoML's schema says a string); an image is non-empty base64 (`format: byte`), and
    a batch or tensor holds at least one item."""
    doc = copy.deepcopy(doc)
    schemas = doc.get("components", {}).get("schemas", {})
    detail = schemas.get("InvalidArgument", {}).get("properties", {}).get("detail")
    if isinstance(detail, dict):
        detail.pop("type", None)
        detail["description"] = "validation details (a list of pydantic errors, when present)"

    def tighten(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                tighten(v)
            return
        if not isinstance(node, dict):
            return
        props = node.get("properties")
        if isinstance(props, dict) and node.get("type") == "object":
            image = props.get(IMAGE_FIELD)
            if isinstance(image, dict) and image.get("type") == "string" \
                    and image.get("format") != "binary":
                image.update(minLength=1, format="byte")
            for name in ("images", "tensor"):
                if isinstance(props.get(name), dict) and props[name].get("type") == "array":
                    props[name]["minItems"] = 1
            images = props.get("images")
            if isinstance(images, dict) and isinstance(images.get("items"), dict):
                images["items"].update(minLength=1, format="byte")
        for v in node.values():
            tighten(v)

    tighten(doc)
    return doc


def openapi30(doc: dict[str, Any]) -> dict[str, Any]:
    return to_openapi30(describe_errors_and_inputs(add_uploads(doc)))


class OpenAPIDocument:
    """Rewrite BentoML's GET /docs.json answer with `openapi30`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD")
                or scope.get("path") != DOC_PATH):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def wrapped(msg: Message) -> None:
            nonlocal start
            if msg["type"] == "http.response.start":
                start = msg
                return
            if msg["type"] != "http.response.body" or start is None:
                await send(msg)
                return
            chunks.append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                try:
                    body = json.dumps(openapi30(json.loads(body))).encode()
                except ValueError:
                    pass
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body",
                        "body": body if scope["method"] == "GET" else b""})

        await self.app(scope, receive, wrapped)
