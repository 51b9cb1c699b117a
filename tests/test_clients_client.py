"""The Python client: typed answers from the real server, errors carrying its message, retries
on 503 and connection errors only, image inputs of every kind, and no torch on import."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest
from conftest import CLASSES, make_pattern_images
from PIL import Image

from deqguard.clients import (
    AsyncClient,
    ClassifyResult,
    Client,
    ClientError,
    ConnectionFailed,
    ServerError,
)
from deqguard.clients.encode import image_bytes
from deqguard.serving.images import decode_image

# -- no torch --------------------------------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_importing_the_client_does_not_import_torch():
    proc = _run("""
        import sys
        import deqguard.clients, deqguard.clients.cli, deqguard.clients.score
        import deqguard.clients.remote, deqguard.clients.output
        heavy = sorted(m for m in ("torch", "torchvision", "bentoml", "ray") if m in sys.modules)
        print(heavy)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_client_works_where_torch_cannot_be_imported():
    proc = _run("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import httpx
        from deqguard.clients import Client
        answer = {"label": 1, "class_name": "b", "probabilities": [0.1, 0.9],
                  "entropy": [0.6, 0.3], "residual": [0.1, 0.01], "iterations": 2,
                  "converged": True, "detection": {"score": 0.3},
                  "model": {"name": "m", "sha256": "0" * 64}}
        t = httpx.MockTransport(lambda r: httpx.Response(200, json=answer))
        print(Client("http://x", transport=t).classify(b"png bytes").class_name)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "b"


# -- retries and errors, against a scripted transport -----------------------------------------
ANSWER = {"label": 2, "class_name": "shape2", "probabilities": [0.1, 0.1, 0.7, 0.1],
          "entropy": [1.2, 0.9, 0.8], "residual": [0.5, 0.05, 0.001], "iterations": 3,
          "converged": True,
          "detection": {"score_name": "final_entropy", "score": 0.8, "threshold": None,
                        "suspicious": False},
          "model": {"name": "tiny-test", "sha256": "a" * 64}}


class Script:
    """A transport answering from a list of steps: a status code, or an exception to raise."""

    def __init__(self, *steps):
        self.steps, self.requests = list(steps), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        if step == 200:
            return httpx.Response(200, json=ANSWER)
        return httpx.Response(step, json={"error": f"scripted {step}"})


def client_for(script: Script, **kw) -> Client:
    return Client("http://test", transport=httpx.MockTransport(script), backoff=0.001, **kw)


def test_retries_503_then_answers():
    script = Script(503, 503, 200)
    result = client_for(script, retries=3).classify(b"img")
    assert isinstance(result, ClassifyResult) and result.class_name == "shape2"
    assert result.entropy == [1.2, 0.9, 0.8]
    assert len(script.requests) == 3


def test_retries_connection_errors_then_answers():
    script = Script(httpx.ConnectError("refused"), httpx.RemoteProtocolError("reset"), 200)
    assert client_for(script, retries=2).classify(b"img").label == 2
    assert len(script.requests) == 3


def test_gives_up_after_the_retries():
    script = Script(503)
    with pytest.raises(ServerError) as err:
        client_for(script, retries=2).classify(b"img")
    assert err.value.status == 503 and len(script.requests) == 3
    script = Script(httpx.ConnectError("refused"))
    with pytest.raises(ConnectionFailed):
        client_for(script, retries=1).classify(b"img")
    assert len(script.requests) == 2


@pytest.mark.parametrize("status", [400, 404, 413, 422, 500])
def test_other_errors_are_not_retried_and_carry_the_message(status):
    script = Script(status, 200)
    with pytest.raises(ServerError) as err:
        client_for(script, retries=3).classify(b"img")
    assert err.value.status == status
    assert err.value.message == f"scripted {status}"
    assert len(script.requests) == 1


def test_read_timeout_is_not_retried():
    script = Script(httpx.ReadTimeout("slow"), 200)
    with pytest.raises(ClientError):
        client_for(script, retries=3).classify(b"img")
    assert len(script.requests) == 1


def test_request_carries_the_image_and_only_the_options_set():
    script = Script(200)
    client_for(script).classify(b"\x89PNG-bytes", max_iter=7, solver="naive")
    body = json.loads(script.requests[0].content)
    assert script.requests[0].url.path == "/classify"
    assert base64.b64decode(body.pop("image")) == b"\x89PNG-bytes"
    assert body == {"max_iter": 7, "solver": "naive"}


def test_bad_options_fail_before_sending():
    script = Script(200)
    with pytest.raises(ValueError, match="max_iters"):
        client_for(script).classify(b"img", max_iters=5)
    with pytest.raises(ValueError):
        client_for(script).classify(b"img", solver="newton")
    assert script.requests == []


def test_classify_many_keeps_order_and_can_return_exceptions():
    def answer(request: httpx.Request) -> httpx.Response:
        tag = base64.b64decode(json.loads(request.content)["image"]).decode()
        if tag == "bad":
            return httpx.Response(400, json={"error": "not an image"})
        return httpx.Response(200, json={**ANSWER, "label": int(tag)})

    client = Client("http://test", transport=httpx.MockTransport(answer))
    labels = [r.label for r in client.classify_many([str(i).encode() for i in range(20)],
                                                    concurrency=4)]
    assert labels == list(range(20))
    mixed = client.classify_many([b"1", b"bad", b"3"], return_exceptions=True)
    assert mixed[0].label == 1 and mixed[2].label == 3
    assert isinstance(mixed[1], ServerError) and mixed[1].message == "not an image"
    with pytest.raises(ServerError):
        client.classify_many([b"1", b"bad"])


def test_async_client_retries_and_keeps_order():
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(503, json={"error": "starting"})
        tag = base64.b64decode(json.loads(request.content)["image"]).decode()
        return httpx.Response(200, json={**ANSWER, "label": int(tag)})

    async def go():
        async with AsyncClient("http://test", transport=httpx.MockTransport(answer),
                               backoff=0.001) as client:
            return await client.classify_many([str(i).encode() for i in range(10)],
                                              concurrency=3)

    assert [r.label for r in asyncio.run(go())] == list(range(10))
    assert len(calls) == 11


# -- image inputs ------------------------------------------------------------------------------
def test_every_image_input_encodes_the_same_pixels(tmp_path):
    x, _ = make_pattern_images(1, seed=3)
    u8 = (x[0, 0] * 255).round().astype(np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(u8).save(path)
    inputs = [path, str(path), path.read_bytes(), Image.fromarray(u8), u8, u8[..., None],
              u8.astype(np.float32) / 255.0, np.repeat(u8[..., None], 3, axis=2)]
    want = decode_image(path.read_bytes(), channels=1, height=28, width=28)
    for im in inputs:
        got = decode_image(image_bytes(im), channels=1, height=28, width=28)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [np.zeros((1, 28, 28), np.uint8), np.full((4, 4), 1.5),
                                 np.zeros((4, 4), np.int64), np.zeros((2, 2, 2, 2), np.uint8)])
def test_unusable_arrays_are_refused_with_a_reason(bad):
    with pytest.raises(ValueError):
        image_bytes(bad)
    with pytest.raises(TypeError):
        image_bytes(3.14)


# -- the real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pngs():
    x, y = make_pattern_images(12, seed=5)
    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray((img[0] * 255).round().astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, y


def test_ready_and_model_info(served_url, tiny_checkpoint):
    from deqguard.models import read_metadata

    with Client(served_url) as client:
        assert client.ready()
        info = client.model_info()
    meta = read_metadata(tiny_checkpoint)
    assert info["classes"] == CLASSES and info["sha256"] == meta.sha256


def test_classify_against_the_server(served_url, pngs):
    images, labels = pngs
    with Client(served_url) as client:
        result = client.classify(images[0])
        assert isinstance(result, ClassifyResult)
        assert result.class_name == CLASSES[result.label]
        assert len(result.entropy) == len(result.residual) == result.iterations >= 1
        assert all(isinstance(v, float) for v in result.entropy)
        assert result.detection.score == pytest.approx(result.entropy[-1], abs=1e-4)
        short = client.classify(images[0], max_iter=2, solver="naive")
        assert short.iterations <= 2 and len(short.entropy) == short.iterations
        many = client.classify_many(images, concurrency=4)
    assert [r.label for r in many] == list(labels)  # order kept; the patterns are learnt
    assert many[0].probabilities == pytest.approx(result.probabilities, abs=1e-5)


def test_image_kinds_give_the_same_answer_from_the_server(served_url, pngs, tmp_path):
    data = pngs[0][1]
    path = tmp_path / "one.png"
    path.write_bytes(data)
    pixels = np.asarray(Image.open(path))
    with Client(served_url) as client:
        answers = [client.classify(im) for im in (path, data, Image.open(path), pixels,
                                                   pixels / 255.0)]
    for a in answers[1:]:
        assert a.label == answers[0].label
        assert a.probabilities == pytest.approx(answers[0].probabilities, abs=1e-6)


def test_server_errors_carry_its_message(served_url):
    with Client(served_url, retries=0) as client:
        with pytest.raises(ServerError) as err:
            client.classify(b"definitely not an image")
        assert 400 <= err.value.status < 500
        assert "image" in err.value.message.lower()
        with pytest.raises(ServerError) as err:
            client.classify(make_png(), max_iter=100000)
        assert 400 <= err.value.status < 500 and "max_iter" in err.value.message
        assert client.ready()  # still serving


def make_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_async_client_against_the_server(served_url, pngs):
    images, labels = pngs

    async def go():
        async with AsyncClient(served_url) as client:
            assert await client.ready()
            return await client.classify_many(images, concurrency=6)

    assert [r.label for r in asyncio.run(go())] == list(labels)


def test_unreachable_server():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with Client(url, retries=2, backoff=0.001) as client:
        assert not client.ready()
        with pytest.raises(ConnectionFailed, match="no answer"):
            client.model_info()
