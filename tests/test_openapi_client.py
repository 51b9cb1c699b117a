"""GET /docs.json as a client generator reads it, against the real server of `served_url`.

The document carries the project's title, version and description, names its schemas like the
wire models of serving/schema.py and its operations like the APIs, and documents every route the
service answers. The slow test generates a client with openapi-python-client from the served
document, installs it with pip and classifies images through it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pngs import png_bytes

REF = "#/components/schemas/"
# BentoML's own routes of every service (probes and metrics).
BENTOML_ROUTES = [("get", "/livez"), ("get", "/readyz"), ("get", "/healthz"), ("get", "/metrics")]


@pytest.fixture(scope="module")
def doc(http):
    return http.get("/docs.json").json()


def _operations(doc: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, item in doc["paths"].items()
            for method, op in item.items()}


def test_the_document_is_named_after_the_project(doc):
    from importlib.metadata import metadata

    import deqguard

    info = doc["info"]
    assert info["title"] == "deqguard"
    assert info["version"] == deqguard.__version__
    assert info["description"].startswith(metadata("deqguard")["Summary"])
    assert "contact" not in info and "bentoml" not in json.dumps(info).lower()


def test_schemas_carry_the_names_of_the_wire_models(doc):
    from deqguard.serving import schema

    schemas = doc["components"]["schemas"]
    text = json.dumps(doc)
    assert "IODescriptor" not in text and "Deqguard" not in text
    for name in ("ClassifyRequest", "ClassifyBatchRequest", "ClassifyTensorRequest",
                 "ClassifyResult", "Detection", "Selective", "ModelRef"):
        assert schemas[name]["title"] == name
        assert set(schemas[name]["properties"]) == set(getattr(schema, name).model_fields), name
    assert set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)) == set(schemas)
    ops = _operations(doc)
    for route, request in (("/classify", "ClassifyRequest"),
                           ("/classify_batch", "ClassifyBatchRequest"),
                           ("/classify_tensor", "ClassifyTensorRequest")):
        post = ops[("post", route)]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": REF + request}
        answer = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer == ({"$ref": REF + "ClassifyResult"} if route == "/classify" else
                          {"type": "array", "items": {"$ref": REF + "ClassifyResult"}})
        assert post["requestBody"]["required"] is True
    upload = ops[("post", "/classify")]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"] == {"$ref": REF + "ClassifyUpload"}
    # optional fields are nullable numbers, not a union with an empty schema (`Any | int`)
    assert '{"nullable": true}' not in text
    tol = schemas["ClassifyRequest"]["properties"]["tol"]
    assert (tol["type"], tol["nullable"], tol["minimum"], tol["exclusiveMinimum"]) == (
        "number", True, 0, True)


def test_nullable_unions_become_nullable_schemas():
    from deqguard.serving.openapi import to_openapi30

    assert to_openapi30({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]}) == {
        "type": "integer", "minimum": 1, "nullable": True}
    assert to_openapi30({"anyOf": [{"$ref": "#/x"}, {"type": "null"}]}) == {
        "nullable": True, "allOf": [{"$ref": "#/x"}]}
    assert to_openapi30({"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}) \
        == {"nullable": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}


def test_each_operation_has_its_own_id_and_a_project_tag(doc):
    ops = _operations(doc)
    ids = {key: op["operationId"] for key, op in ops.items()}
    assert {("post", "/classify"): "classify", ("post", "/classify_batch"): "classify_batch",
            ("post", "/classify_tensor"): "classify_tensor", ("get", "/model"): "get_model",
            ("get", "/ui/"): "get_ui", ("get", "/livez"): "livez", ("get", "/readyz"): "readyz",
            ("get", "/metrics"): "metrics"}.items() <= ids.items()
    assert len(set(ids.values())) == len(ids)
    tags = {t["name"] for t in doc["tags"]}
    assert {"classify", "model", "ui", "infrastructure"} == tags
    assert all(op["tags"] and set(op["tags"]) <= tags for op in ops.values())


def test_every_route_the_service_answers_is_documented(doc, http):
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from starlette.routing import Mount

    from deqguard.serving.openapi import UNDOCUMENTED
    from deqguard.serving.service import _META_APP, DEQGuard

    answered = [("post", api.route) for api in DEQGuard.apis.values()] + BENTOML_ROUTES
    for route in _META_APP.routes:
        if isinstance(route, Mount):
            answered.append(("get", route.path + "/"))
        else:
            answered += [(m.lower(), route.path) for m in route.methods if m != "HEAD"]
    answered = [(m, p) for m, p in answered if p not in UNDOCUMENTED]
    assert {("get", "/model"), ("get", "/ui/"), ("post", "/classify")} <= set(answered)
    ops = _operations(doc)
    assert set(answered) <= set(ops)
    for method, path in ops:  # and nothing documented that the server does not answer
        r = http.request(method.upper(), path, json={} if method == "post" else None)
        assert r.status_code not in (404, 405), (method, path, r.status_code)


# -- a generated client ------------------------------------------------------------------------

_CLIENT_SCRIPT = """
import base64, io, json, sys
from importlib.metadata import version
from deqguard_client import Client
from deqguard_client.api.classify import classify, classify_batch
from deqguard_client.api.model import get_model
from deqguard_client.models import ClassifyBatchRequest, ClassifyRequest, ClassifyUpload
from deqguard_client.types import File

url, pngs = sys.argv[1], json.loads(sys.argv[2])
raw = [open(p, "rb").read() for p in pngs]
b64 = [base64.b64encode(b).decode() for b in raw]
with Client(base_url=url, timeout=120, raise_on_unexpected_status=True) as client:
    one = classify.sync(client=client, body=ClassifyRequest(image=b64[0], max_iter=12))
    upload = classify.sync(client=client, body=ClassifyUpload(
        image=File(payload=io.BytesIO(raw[0]), file_name="x.png", mime_type="image/png"),
        max_iter=12))
    batch = classify_batch.sync(client=client,
                                body=ClassifyBatchRequest(images=b64, max_iter=12))
    model = get_model.sync(client=client)
print(json.dumps({"version": version("deqguard-client"), "one": one.to_dict(),
                  "upload": upload.to_dict(), "batch": [r.to_dict() for r in batch],
                  "sha256": model.sha256}))
"""


@pytest.mark.slow
def test_a_generated_client_installs_and_classifies(served_url, http, pattern_data, tmp_path):
    generator = shutil.which("openapi-python-client")
    if generator is None:
        pytest.skip("openapi-python-client is not on PATH: install it in a venv of its own "
                    "(`pipx install 'openapi-python-client==0.29.*'`; it pins httpx<0.29)")
    import deqguard

    spec = tmp_path / "openapi.json"
    spec.write_bytes(http.get("/docs.json").content)
    client_dir = tmp_path / "deqguard-client"
    # setup.py metadata: pip builds it offline with this venv's setuptools (the default,
    # poetry, needs poetry-core from the index).
    gen = subprocess.run([generator, "generate", "--path", str(spec), "--meta", "setup",
                          "--output-path", str(client_dir)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                          "--no-build-isolation", "--target", str(site), str(client_dir)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]

    x, _ = pattern_data
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"img{i}.png"))
        Path(paths[-1]).write_bytes(png_bytes(x[i]))
    run = subprocess.run([sys.executable, "-c", _CLIENT_SCRIPT, served_url, json.dumps(paths)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    assert got["version"] == deqguard.__version__
    direct = http.post("/classify_batch", json={
        "images": [base64.b64encode(Path(p).read_bytes()).decode() for p in paths],
        "max_iter": 12}).json()
    for a, b in zip([got["one"], got["upload"], *got["batch"]], [direct[0], direct[0], *direct],
                    strict=True):
        assert (a["label"], a["iterations"], a["probabilities"]) == (
            b["label"], b["iterations"], b["probabilities"])
    assert got["sha256"] == http.get("/model").json()["sha256"]
