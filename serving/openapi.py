"""GET /docs.json as a valid OpenAPI 3.0 document, with the upload forms of POST /classify.

BentoML 1.4 declares `openapi: 3.0.2` but embeds pydantic's JSON Schema (draft 2020-12, the
dialect of OpenAPI 3.1): numeric `exclusiveMinimum`, `{"type": "null"}` in `anyOf`, `const`,
`examples` lists. Strict 3.0 tools and client generators reject those. `to_openapi30` rewrites
them into their 3.0 spellings (boolean exclusive bounds, `nullable`, `enum`, `example`);
`add_routes` documents the routes of the mounted app BentoML does not see (GET /model, /ui/);
openapi_names.py names the document and its parts after the project; `add_uploads` documents the
multipart and raw-image bodies serving/uploads.py accepts; the `OpenAPIDocument` middleware
applies all of them to BentoML's answer. tests/test_serving_uploads.py validates the result with
openapi-spec-validator; tests/test_openapi_client.py generates a client from it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .middleware import ASGIApp, Message, Receive, Scope, Send
from .openapi_names import name_document
from .uploads import IMAGE_FIELD, UPLOAD_ROUTES

DOC_PATH = "/docs.json"
_REF = "#/components/schemas/"
_NULLABLE = {"nullable": True}
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
        # Options are converted already: {"type": "null"} reads {"nullable": True} here.
        if isinstance(options, list) and _NULLABLE in options:
            rest = [o for o in options if o != _NULLABLE]
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


_OBJECT = {"type": "object", "additionalProperties": True}
MODEL_INFO = {
    "type": "object", "title": "ModelInfo", "additionalProperties": True,
    "description": "The served checkpoint's metadata (its name, hash, classes, input, "
                   "architecture, training record, metrics and calibrations) and `serving`: how "
                   "this server runs it.",
    "required": ["sha256", "classes", "input", "model", "serving"],
    "properties": {
        "name": {"type": "string"}, "sha256": {"type": "string"},
        "deqguard_version": {"type": "string"},
        "classes": {"type": "array", "items": {"type": "string"}},
        "input": {**_OBJECT, "description": "how an image is prepared: channels, height, width, "
                                            "value_range, mean, std"},
        "model": {**_OBJECT, "description": "the architecture and its solver settings"},
        "serving": {**_OBJECT, "required": ["backend", "max_iter_cap", "defaults"],
                    "description": "backend, max_iter_cap, defaults (of the request options), "
                                   "defenses, solvers and the selective calibration's coverages",
                    "properties": {"backend": {"type": "string", "enum": ["torch", "onnx"]},
                                   "max_iter_cap": {"type": "integer"},
                                   "defaults": _OBJECT,
                                   "defenses": {"type": "array", "items": {"type": "string"}},
                                   "solvers": {"type": "array", "items": {"type": "string"}}}},
    },
}
_STARTING = {"503": {"description": "The service is still starting"}}
# The routes of the Starlette app service.py mounts next to the APIs: BentoML documents the
# routes of a mounted FastAPI app only.
MOUNTED_ROUTES: dict[str, dict[str, Any]] = {
    "/model": {"get": {
        "operationId": "get_model", "tags": ["model"],
        "description": "The served checkpoint's metadata, and the defaults and caps of the "
                       "request options.",
        "responses": {"200": {"description": "Successful Response", "content": {
            "application/json": {"schema": {"$ref": _REF + "ModelInfo"}}}}, **_STARTING}}},
    "/ui/": {"get": {
        "operationId": "get_ui", "tags": ["ui"],
        "description": "The web page: pick or drop an image, see the prediction and its "
                       "entropy and residual per solver iteration.",
        "responses": {"200": {"description": "The HTML page", "content": {
            "text/html": {"schema": {"type": "string"}}}}}}},
}
# Documentation of the documentation is left out: `/` (a redirect to /ui), the API page /docs/
# and its Swagger files, /docs.json, BentoML's /schema.json and its assets.
UNDOCUMENTED = ("/", "/docs/", "/docs/swagger/", DOC_PATH, "/schema.json", "/static_content")


def add_routes(doc: dict[str, Any]) -> dict[str, Any]:
    """Document MOUNTED_ROUTES and the 503 of the readiness and liveness probes."""
    doc = copy.deepcopy(doc)
    paths = doc.setdefault("paths", {})
    for path, item in MOUNTED_ROUTES.items():
        paths.setdefault(path, copy.deepcopy(item))
    doc.setdefault("components", {}).setdefault("schemas", {})["ModelInfo"] = copy.deepcopy(
        MODEL_INFO)
    for probe in ("/livez", "/readyz", "/healthz"):
        get = paths.get(probe, {}).get("get")
        if isinstance(get, dict):
            get.setdefault("responses", {}).setdefault(
                "503", {"description": "Not alive (/livez) or not ready (/readyz) yet"})
    return doc


def add_uploads(doc: dict[str, Any]) -> dict[str, Any]:
    """Document the multipart and image/* bodies of UPLOAD_ROUTES, and the 413/415/422 errors."""
    doc = copy.deepcopy(doc)
    error_ref = None
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
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
        ref = schema.get("$ref", "")
        if ref.startswith(_REF):
            schema = schemas.get(ref[len(_REF):], {})
        options = {k: v for k, v in schema.get("properties", {}).items() if k != IMAGE_FIELD}
        upload = path.strip("/").title().replace("_", "") + "Upload"  # ClassifyUpload
        schemas[upload] = {
            "type": "object", "title": upload, "required": [IMAGE_FIELD],
            "additionalProperties": False,
            "properties": {IMAGE_FIELD: {"type": "string", "format": "binary",
                                         "description": "the image file (PNG, JPEG, WebP, ...)"},
                           **copy.deepcopy(options)}}
        content["multipart/form-data"] = {"schema": {"$ref": _REF + upload}}
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
    errors (BentoML's schema says a string); a request body is required (an empty one is a 400);
    an image is non-empty base64 (`format: byte`), and a batch or tensor holds at least one
    item."""
    doc = copy.deepcopy(doc)
    for item in doc.get("paths", {}).values():
        body = item.get("post", {}).get("requestBody")
        if isinstance(body, dict):
            body["required"] = True
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
    """BentoML's document as served: every route, named after the project, valid OpenAPI 3.0."""
    return to_openapi30(describe_errors_and_inputs(add_uploads(name_document(add_routes(doc)))))


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
