"""Name BentoML's OpenAPI document and its parts after the project, so generated clients read well.

BentoML 1.4 versions the document "None" outside a built Bento (a client generated from it then
fails to install: "None" is no PEP 440 version), describes it with its own README boilerplate and
contact, names request and answer schemas after its IO descriptors (`ClassifyRequestIODescriptor`)
and repeats them inline in every operation (generators then invent names such as
`DeqguardClassifyJsonClassifyRequestIODescriptor`), prefixes operation ids with the service name
and files the routes under a "Service APIs" tag (a generated module `service_ap_is`).
`name_document` gives the project's title, version and description, shares one schema per wire
model under the name serving/schema.py gives it, one operation id per route, and tags a generated
client can name its modules after.
"""

from __future__ import annotations

import copy
from typing import Any

TITLE = "deqguard"
_REF = "#/components/schemas/"
_DESCRIPTOR = "IODescriptor"
TAGS = [
    {"name": "classify", "description": "Classify images: one (JSON, multipart upload or raw "
                                        "image body), a batch of encoded images, or a tensor."},
    {"name": "model", "description": "What this server serves: the checkpoint's metadata and "
                                     "the serving defaults and caps."},
    {"name": "ui", "description": "The web page for people."},
    {"name": "infrastructure", "description": "Health probes and Prometheus metrics."},
]
_BENTOML_TAGS = {"Service APIs": "classify", "Infrastructure": "infrastructure"}


def project_description() -> str:
    """The package's one-line summary (pyproject's `description`), then what the service offers."""
    from importlib.metadata import PackageNotFoundError, metadata

    import deqguard

    try:
        summary = metadata("deqguard")["Summary"]
    except PackageNotFoundError:  # run from a source tree without installing
        summary = (deqguard.__doc__ or TITLE).strip().splitlines()[0]
    return (
        f"{summary}\n\n"
        "The deqguard HTTP service answers each image with its prediction, the entropy and "
        "residual of every solver iterate, an attack-detection flag and, on request, a "
        "selective (abstain) decision. POST /classify takes one image (JSON with base64, a "
        "multipart upload or the raw image body), /classify_batch several, /classify_tensor "
        "nested lists of pixel values; GET /model says which checkpoint is served and the "
        "defaults and caps of its options. Errors are 4xx answers {\"error\": message}.")


def _clean(name: str) -> str:
    return name.removesuffix(_DESCRIPTOR) or name


def _walk(node: Any, fn: Any) -> Any:
    """`fn` applied bottom-up to every dict of `node` (a copy)."""
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    if not isinstance(node, dict):
        return node
    return fn({k: _walk(v, fn) for k, v in node.items()})


def _rename_refs(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(_REF):
        node["$ref"] = _REF + _clean(ref[len(_REF):])
    return node


def share_schemas(doc: dict[str, Any]) -> dict[str, Any]:
    """Components named like the pydantic models (`ClassifyRequest`), and a $ref to them in place
    of every inline copy; schemas nothing refers to (BentoML's task status) are dropped."""
    doc = _walk(copy.deepcopy(doc), _rename_refs)
    components = doc.setdefault("components", {})
    old = components.get("schemas", {})
    schemas: dict[str, Any] = {}
    for name, schema in old.items():
        clean = _clean(name)
        if clean != name and clean in old:
            continue  # BentoML documents the answer model twice: keep the plain one
        if isinstance(schema, dict) and schema.get("title") == name:
            schema = {**schema, "title": clean}
        schemas[clean] = schema

    def to_ref(node: dict[str, Any]) -> dict[str, Any]:
        title = node.get("title")
        if isinstance(title, str) and title.endswith(_DESCRIPTOR) and _clean(title) in schemas:
            return {"$ref": _REF + _clean(title)}
        return node

    doc["paths"] = _walk(doc.get("paths", {}), to_ref)
    components["schemas"] = _used(doc, schemas)
    return doc


def _used(doc: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """The schemas reachable by $ref from outside `components.schemas`."""
    def refs(node: Any) -> set[str]:
        found: set[str] = set()

        def collect(n: dict[str, Any]) -> dict[str, Any]:
            ref = n.get("$ref")
            if isinstance(ref, str) and ref.startswith(_REF):
                found.add(ref[len(_REF):])
            return n

        _walk(node, collect)
        return found

    outside = {k: v for k, v in doc.items() if k != "components"}
    outside["components"] = {k: v for k, v in doc.get("components", {}).items()
                             if k != "schemas"}
    todo, keep = refs(outside), set()
    while todo:
        name = todo.pop()
        if name in keep or name not in schemas:
            continue
        keep.add(name)
        todo |= refs(schemas[name])
    return {k: v for k, v in schemas.items() if k in keep}


def name_operations(doc: dict[str, Any]) -> dict[str, Any]:
    """One operationId per operation (the API's name, or the path's for BentoML's probes) and the
    project's tags."""
    doc = copy.deepcopy(doc)
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            name = op.get("x-bentoml-name") or path.strip("/").replace("/", "_")
            if not op.get("operationId") or "__" in op["operationId"]:
                op["operationId"] = name
            op["tags"] = [_BENTOML_TAGS.get(t, t) for t in op.get("tags", [])]
    doc["tags"] = copy.deepcopy(TAGS)
    return doc


def name_document(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the project's title, version and description, shared schemas and named
    operations."""
    import deqguard

    doc = name_operations(share_schemas(doc))
    doc["info"] = {"title": TITLE, "version": deqguard.__version__,
                   "description": project_description()}
    return doc
