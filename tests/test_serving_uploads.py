"""POST /classify with uploads (multipart and raw image bodies), anytime inference (deadline and
settled exits, `stopped`) and /docs.json, against the real server of the `served_url` fixture."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from pngs import png_bomb, png_bytes


@pytest.fixture(scope="module")
def pngs(pattern_data):
    x, _ = pattern_data
    return [png_bytes(x[i]) for i in range(4)]


def _json(http, png: bytes, **opts) -> httpx.Response:
    return http.post("/classify", json={"image": base64.b64encode(png).decode(), **opts})


def _multipart(http, png: bytes, **opts) -> httpx.Response:
    return http.post("/classify", files={"image": ("x.png", png, "image/png")},
                     data={k: str(v) for k, v in opts.items()})


def _raw(http, png: bytes, ctype: str = "image/png", **opts) -> httpx.Response:
    return http.post("/classify", content=png, headers={"content-type": ctype},
                     params={k: str(v) for k, v in opts.items()})


FORMS = {"json": _json, "multipart": _multipart, "raw": _raw}


def _same(a: dict, b: dict) -> None:
    assert (a["label"], a["iterations"], a["converged"], a["stopped"]) == (
        b["label"], b["iterations"], b["converged"], b["stopped"])
    for key in ("probabilities", "entropy", "residual"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=key)


def test_multipart_and_raw_uploads_answer_like_json(http, pngs):
    for opts in ({}, {"max_iter": 7, "solver": "naive", "trajectory": False},
                 {"settle_iters": 0, "tol": 0.01}):
        want = _json(http, pngs[1], **opts)
        assert want.status_code == 200, want.text
        for form in ("multipart", "raw"):
            got = FORMS[form](http, pngs[1], **opts)
            assert got.status_code == 200, f"{form} {opts}: {got.text}"
            _same(got.json(), want.json())


def test_raw_bodies_of_other_image_types_are_accepted(http, pattern_data):
    x, _ = pattern_data
    im = Image.fromarray((x[2, 0] * 255).astype(np.uint8))
    for fmt, ctype in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        im.save(buf, fmt)
        want = _json(http, buf.getvalue()).json()
        got = _raw(http, buf.getvalue(), ctype)
        assert got.status_code == 200, got.text
        _same(got.json(), want)


BAD = [  # name, image bytes (None: the good PNG), options, status, words in the error
    ("non-image", b"this is plain text, not an image", {}, 400, "not a recognised image"),
    ("truncated", "half", {}, 400, "truncated"),
    ("bomb", png_bomb(50_000, 50_000), {}, 400, "decompression bomb"),
    ("oversized", b"\x89PNG" + b"A" * (9 * 1024 * 1024), {}, 413, "limit of 8388608 bytes"),
    ("unknown field", None, {"max_iters": 3}, 400, "max_iters"),
    ("bad value", None, {"max_iter": "many"}, 400, "max_iter"),
    ("over the cap", None, {"max_iter": 101}, 422, "server cap"),
    ("unknown solver", None, {"solver": "newton"}, 400, "solver"),
]


@pytest.mark.parametrize("form", list(FORMS))
def test_bad_uploads_get_their_4xx_in_every_form(http, pngs, form):
    failures = []
    for name, data, opts, status, words in BAD:
        png = pngs[0] if data is None else pngs[0][: len(pngs[0]) // 2] if data == "half" \
            else data
        r = FORMS[form](http, png, **opts)
        try:
            err = r.json().get("error", "")
        except ValueError:
            err = ""
        if r.status_code != status or words.lower() not in err.lower():
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
        ok = _json(http, pngs[0], max_iter=2)
        assert ok.status_code == 200, f"server stopped serving after {form} {name}"
    assert not failures, "\n".join(failures)


def test_malformed_multipart_forms_are_400(http, pngs):
    cases = [
        ({"files": {"picture": ("x.png", pngs[0], "image/png")}}, "picture"),
        ({"data": {"max_iter": "3"}}, "image"),  # no image at all
        ({"files": [("image", ("a.png", pngs[0], "image/png")),
                    ("image", ("b.png", pngs[0], "image/png"))]}, "image"),
        ({"content": b"--nope\r\nnot a form", "headers": {
            "content-type": "multipart/form-data; boundary=xyz"}}, "image"),
    ]
    for kwargs, words in cases:
        r = http.post("/classify", **kwargs)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    r = _raw(http, pngs[0], image="again")
    assert r.status_code == 400 and "query" in r.json()["error"]


def test_other_routes_still_take_json_only(http, pngs):
    r = http.post("/classify_batch", files={"image": ("x.png", pngs[0], "image/png")})
    assert r.status_code == 415 and "JSON" in r.json()["error"]
    r = http.post("/classify", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]


# -- anytime inference ---------------------------------------------------------------------------

def test_stopped_says_why(http, pngs):
    full = _json(http, pngs[0], max_iter=9, tol=1e-9, settle_iters=0).json()
    assert (full["stopped"], full["iterations"], full["converged"]) == ("max_iter", 9, False)
    loose = _json(http, pngs[0], max_iter=50, tol=0.5, settle_iters=0).json()
    assert loose["stopped"] == "tol" and loose["converged"]
    settled = _json(http, pngs[0], max_iter=50, tol=1e-9, settle_iters=1,
                    settle_entropy=100).json()
    assert (settled["stopped"], settled["iterations"]) == ("settled", 1)
    assert not settled["converged"] and len(settled["entropy"]) == 1
    three = _json(http, pngs[0], max_iter=50, tol=1e-9, settle_iters=3,
                  settle_entropy=100).json()
    assert three["stopped"] == "settled" and three["iterations"] >= 3


def test_the_default_settled_exit_is_served_and_described(http, pngs):
    d = http.get("/model").json()["serving"]["defaults"]
    assert d["settle_iters"] >= 1 and d["settle_entropy"] > 0
    a = _json(http, pngs[0]).json()
    b = _json(http, pngs[0], settle_iters=d["settle_iters"],
              settle_entropy=d["settle_entropy"]).json()
    _same(a, b)


def test_a_passed_deadline_answers_with_the_current_iterate(http, pngs):
    # 1 ms is over before the solve starts (front -> model hop): one iteration, then stop
    r = _json(http, pngs[0], max_iter=100, tol=1e-9, settle_iters=0, deadline_ms=1).json()
    assert (r["stopped"], r["iterations"], r["converged"]) == ("deadline", 1, False)
    assert len(r["entropy"]) == len(r["residual"]) == 1
    for form in ("multipart", "raw"):
        g = FORMS[form](http, pngs[0], max_iter=100, tol=1e-9, settle_iters=0, deadline_ms=1)
        assert g.json()["stopped"] == "deadline", g.text
    # a generous deadline is not reached: the answer is the plain one
    far = _json(http, pngs[0], max_iter=6, deadline_ms=600_000).json()
    _same(far, _json(http, pngs[0], max_iter=6).json())


def test_deadline_with_the_defense_is_refused(http, pngs):
    r = _json(http, pngs[0], defense="entropy-reduction", deadline_ms=50)
    assert r.status_code == 422 and "deadline_ms" in r.json()["error"]


def test_a_batch_mates_deadline_does_not_change_an_answer(served_url, pngs):
    """Concurrent requests share model batches; the deadline ones stop, the others don't move."""
    opts = {"max_iter": 40, "tol": 1e-9, "settle_iters": 0}
    with httpx.Client(base_url=served_url, timeout=120) as c:
        alone = _json(c, pngs[2], **opts).json()

        def post(i: int) -> dict:
            extra = {"deadline_ms": 1} if i % 2 else {}
            return _json(c, pngs[2], **opts, **extra).json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(16)))
    for i, a in enumerate(answers):
        if i % 2:
            assert a["stopped"] == "deadline"
        else:
            _same(a, alone)


def test_engine_deadlines_are_per_sample(tiny_checkpoint, pattern_data):
    """In one sub-batch, a sample past its deadline stops; its batch mates answer as alone."""
    from deqguard.serving.torch_engine import TorchEngine

    x, _ = pattern_data
    eng = TorchEngine.load(str(tiny_checkpoint), device="cpu", threads=1)
    opts = eng.resolve(max_iter=30, tol=1e-9, settle_iters=0)
    traces = eng.trace(x[:3], opts, np.array([time.time() - 1, np.inf, np.inf]))
    assert traces[0].stopped == "deadline" and traces[0].iterations == 1
    alone = eng.trace(x[1:3], opts)
    for t, a in zip(traces[1:], alone, strict=True):
        assert t.stopped == a.stopped == "max_iter" and t.iterations == a.iterations == 30
        np.testing.assert_array_equal(t.logits, a.logits)


# -- the OpenAPI document ------------------------------------------------------------------------

def test_docs_json_is_valid_openapi_for_its_declared_version(http):
    from openapi_spec_validator import validate

    doc = http.get("/docs.json").json()
    assert doc["openapi"].startswith("3.0")
    validate(doc)
    content = doc["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/*"} <= set(content)
    ref = content["application/json"]["schema"]["$ref"]
    tol = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]["tol"]
    assert tol["exclusiveMinimum"] is True and tol["minimum"] == 0


def test_the_ui_page_is_served(http):
    page = http.get("/ui/")
    assert page.status_code == 200 and "entropy-chart" in page.text
    assert http.get("/ui/app.js").status_code == 200
    index = http.get("/ui/examples/index.json").json()
    assert index["examples"]
    first = http.get("/ui/examples/" + index["examples"][0]["file"])
    assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
