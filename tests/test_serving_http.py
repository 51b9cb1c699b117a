"""The real server over real HTTP: schema, parity with the in-process engine, batch invariance,
every kind of bad input (a 4xx, and the server keeps serving), /model and /metrics."""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from pngs import png_bomb, png_bytes

from deqguard.serving.schema import ClassifyResult


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def images(pattern_data):
    """Eight pattern images as PNG bytes, and the arrays the server will see after decoding."""
    from deqguard.serving.images import decode_image

    x, _ = pattern_data
    pngs = [png_bytes(x[i]) for i in range(8)]
    arrays = np.stack([decode_image(p, channels=1, height=28, width=28) for p in pngs])
    return pngs, arrays


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from deqguard.serving.torch_engine import TorchEngine

    return TorchEngine.load(str(tiny_checkpoint), device="cpu", threads=1)


def _assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Same answer: labels, iterations, convergence, trajectory lengths equal; floats equal up to
    1e-6 (bit-identical on CPU, see Engine.trace; JSON round trips are exact)."""
    assert a["label"] == b["label"] and a["iterations"] == b["iterations"]
    assert a["converged"] == b["converged"]
    for key in ("probabilities", "entropy", "residual"):
        assert len(a[key]) == len(b[key]), key
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg=key)
    np.testing.assert_allclose(a["detection"]["score"], b["detection"]["score"], atol=atol)


def _still_serving(http, pngs) -> None:
    r = http.post("/classify", json={"image": _b64(pngs[0]), "max_iter": 2})
    assert r.status_code == 200, r.text


# -- happy paths -------------------------------------------------------------------------------

def test_classify_schema_and_parity_with_in_process_engine(http, images, engine, tiny_checkpoint):
    from deqguard.models import read_metadata

    pngs, arrays = images
    meta = read_metadata(tiny_checkpoint)
    r = http.post("/classify", json={"image": _b64(pngs[0]), "max_iter": 6, "solver": "broyden"})
    assert r.status_code == 200, r.text
    body = r.json()
    res = ClassifyResult.model_validate(body)
    assert 1 <= res.iterations <= 6 and len(res.entropy) == res.iterations == len(res.residual)
    assert abs(sum(res.probabilities) - 1) < 1e-6 and len(res.probabilities) == 4
    assert res.class_name == meta.classes[res.label]
    assert res.model.sha256 == meta.sha256 and res.model.name == "tiny-test"
    assert res.detection.threshold is None and res.detection.suspicious is False
    assert res.detection.score_name == "final_entropy"
    assert res.detection.score == pytest.approx(res.entropy[-1], abs=1e-6)

    opts = engine.resolve(max_iter=6, solver="broyden")
    local = engine.classify(arrays[:1], opts)[0].model_dump(mode="json")
    _assert_same(body, local)


def test_defaults_come_from_the_checkpoint(http, images, engine):
    pngs, arrays = images
    body = http.post("/classify", json={"image": _b64(pngs[1])}).json()
    local = engine.classify(arrays[1:2], engine.resolve())[0].model_dump(mode="json")
    _assert_same(body, local)


def test_trajectory_false_drops_only_the_trajectories(http, images):
    pngs, _ = images
    full = http.post("/classify", json={"image": _b64(pngs[2])}).json()
    short = http.post("/classify", json={"image": _b64(pngs[2]), "trajectory": False}).json()
    assert short["entropy"] == [] and short["residual"] == []
    assert short["iterations"] == full["iterations"] and short["label"] == full["label"]
    assert short["detection"] == full["detection"]


def test_batch_and_tensor_answer_in_order_like_single_calls(http, images):
    pngs, arrays = images
    opts = {"max_iter": 8, "tol": 1e-3, "solver": "anderson"}
    batch = http.post("/classify_batch", json={"images": [_b64(p) for p in pngs], **opts})
    assert batch.status_code == 200, batch.text
    tensor = http.post("/classify_tensor", json={"tensor": arrays.tolist(), **opts})
    assert tensor.status_code == 200, tensor.text
    assert len(batch.json()) == len(tensor.json()) == len(pngs)
    for i in (0, 5):
        single = http.post("/classify", json={"image": _b64(pngs[i]), **opts}).json()
        _assert_same(batch.json()[i], single)
        _assert_same(tensor.json()[i], single)


def test_entropy_reduction_defense_is_served(http, images, engine):
    pngs, arrays = images
    r = http.post("/classify", json={"image": _b64(pngs[3]), "defense": "entropy-reduction",
                                     "solver": "broyden"})
    assert r.status_code == 200, r.text
    body = r.json()
    local = engine.classify(arrays[3:4], engine.resolve(defense="entropy-reduction",
                                                        solver="broyden"))[0]
    _assert_same(body, local.model_dump(mode="json"))
    plain = http.post("/classify", json={"image": _b64(pngs[3]), "solver": "broyden",
                                         "max_iter": body["iterations"]}).json()
    # same budget, but the purified input changes the trajectory after the first round
    assert not np.allclose(plain["entropy"], body["entropy"])


def test_answers_do_not_depend_on_batch_mates(http, images, served_url):
    """20 concurrent requests with different budgets and options vs each one alone."""
    pngs, _ = images
    variants = [{"max_iter": 2}, {"max_iter": 30, "tol": 1e-4}, {"max_iter": 7, "solver": "naive"},
                {"max_iter": 12, "solver": "broyden"}, {"tol": 0.05},
                {"max_iter": 4, "defense": "entropy-reduction"}]
    reqs = [{"image": _b64(pngs[i % len(pngs)]), **variants[i % len(variants)]}
            for i in range(20)]
    alone = [http.post("/classify", json=q).json() for q in reqs]

    def batch_stats() -> tuple[float, float]:
        text = http.get("/metrics").text
        total = count = 0.0
        for line in text.splitlines():
            if 'method_name="infer"' in line and line.startswith("bentoml_service_adaptive"):
                if line.split("{")[0].endswith("_sum"):
                    total += float(line.rsplit(" ", 1)[1])
                elif line.split("{")[0].endswith("_count"):
                    count += float(line.rsplit(" ", 1)[1])
        return total, count

    before = batch_stats()
    together: list = []
    for _ in range(3):  # a few rounds: the first batches of a fresh dispatcher are single items
        with httpx.Client(base_url=served_url, timeout=120) as c, ThreadPoolExecutor(20) as pool:
            together = list(pool.map(lambda q: c.post("/classify", json=q), reqs))
        after = batch_stats()
        if after[0] - before[0] > after[1] - before[1]:
            break
    assert all(r.status_code == 200 for r in together), [r.text for r in together][:3]
    for a, b in zip(alone, together, strict=True):
        _assert_same(a, b.json())
    # the concurrent requests were really batched together (some batch held several items)
    assert after[0] - before[0] > after[1] - before[1], (before, after)


# -- /model and /metrics -----------------------------------------------------------------------

def test_model_endpoint(http, tiny_checkpoint):
    from deqguard.models import read_metadata

    meta = read_metadata(tiny_checkpoint)
    r = http.get("/model")
    assert r.status_code == 200
    body = r.json()
    assert body["sha256"] == meta.sha256 and body["classes"] == meta.classes
    assert body["input"]["channels"] == 1 and body["model"]["arch"] == "tiny-deq"
    assert body["detection"] is None
    serving = body["serving"]
    assert serving["backend"] == "torch" and serving["max_iter_cap"] == 100
    assert serving["defaults"]["solver"] == meta.model["solver"]["solver"]
    assert "entropy-reduction" in serving["defenses"]


def test_health_and_metrics(http, images):
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    _still_serving(http, images[0])
    text = http.get("/metrics").text
    for name in ("deqguard_solver_iterations_bucket", "deqguard_final_residual_bucket",
                 "deqguard_final_entropy_bucket", "deqguard_suspicious_answers_total",
                 "bentoml_service_request_total"):
        assert name in text, name
    m = re.search(r'deqguard_solver_iterations_count\{[^}]*solver="naive"[^}]*\} (\S+)', text)
    assert m and float(m.group(1)) >= 1


# -- bad input: a clear 4xx, never a 500, and the server keeps serving -------------------------

def _bad_cases(pngs: list[bytes]) -> list[tuple[str, str, dict | bytes, int, str]]:
    png = pngs[0]
    good = _b64(png)
    t_ok = np.full((1, 1, 28, 28), 0.5).tolist()
    t_nan = json.dumps({"tensor": t_ok}).replace("0.5", "NaN", 1).encode()
    t_inf = json.dumps({"tensor": t_ok}).replace("0.5", "Infinity", 1).encode()
    return [
        ("non-image", "/classify", {"image": _b64(b"this is plain text, not an image")}, 400,
         "not a recognised image"),
        ("truncated png", "/classify", {"image": _b64(png[: len(png) // 2])}, 400,
         "truncated"),
        ("bomb", "/classify", {"image": _b64(png_bomb(50_000, 50_000))}, 400,
         "decompression bomb"),
        ("request pixels", "/classify_batch",
         {"images": [_b64(png_bomb(4000, 4000))] * 5}, 413, "pixels together"),
        ("invalid base64", "/classify", {"image": "%%% not base64 %%%"}, 400, "base64"),
        ("empty image", "/classify", {"image": ""}, 400, "empty"),
        ("empty batch", "/classify_batch", {"images": []}, 400, "empty batch"),
        ("batch over cap", "/classify_batch", {"images": [good] * 257}, 413, "batch cap"),
        ("bad image in batch", "/classify_batch", {"images": [good, _b64(b"GIF89a junk")]},
         400, "image 1"),
        ("empty tensor", "/classify_tensor", {"tensor": []}, 400, "shape"),
        ("tensor shape", "/classify_tensor", {"tensor": np.zeros((1, 3, 28, 28)).tolist()}, 400,
         "shape [N, 1, 28, 28]"),
        ("tensor ragged", "/classify_tensor", {"tensor": [[[[0.1, 0.2], [0.3]]]]}, 400,
         "ragged"),
        ("tensor strings", "/classify_tensor", {"tensor": [[[["a"] * 28] * 28]]}, 400,
         "numbers"),
        ("tensor bools", "/classify_tensor", {"tensor": [[[[True] * 28] * 28]]}, 400,
         "booleans"),
        ("tensor NaN", "/classify_tensor", t_nan, 400, "NaN"),
        ("tensor inf", "/classify_tensor", t_inf, 400, "NaN or infinite"),
        ("tensor range", "/classify_tensor", {"tensor": np.full((1, 1, 28, 28), 2.0).tolist()},
         400, "[0, 1]"),
        ("tensor over cap", "/classify_tensor", {"tensor": np.zeros((257, 1, 28, 28)).tolist()},
         413, "batch cap"),
        ("max_iter 0", "/classify", {"image": good, "max_iter": 0}, 400, "max_iter"),
        ("max_iter over cap", "/classify", {"image": good, "max_iter": 101}, 422, "server cap"),
        ("tol 0", "/classify", {"image": good, "tol": 0}, 400, "tol"),
        ("tol over 1", "/classify", {"image": good, "tol": 5}, 400, "tol"),
        ("unknown solver", "/classify", {"image": good, "solver": "newton"}, 400, "solver"),
        ("unknown defense", "/classify", {"image": good, "defense": "magic"}, 400, "defense"),
        ("unknown field", "/classify", {"image": good, "max_iters": 3}, 400, "max_iters"),
        ("missing image", "/classify", {"max_iter": 3}, 400, "image"),
        ("wrong type", "/classify", {"image": 123}, 400, "image"),
        ("not json", "/classify", b"this is not json", 400, "invalid request"),
        ("json array", "/classify", b"[1, 2, 3]", 400, "invalid request"),
    ]


def test_bad_inputs_get_a_clear_4xx_and_the_server_keeps_serving(http, images):
    pngs, _ = images
    failures = []
    for name, route, body, status, words in _bad_cases(pngs):
        if isinstance(body, bytes):
            r = http.post(route, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(route, json=body)
        try:
            err = r.json().get("error", "")
        except ValueError:
            err = ""
        if r.status_code != status or words.lower() not in err.lower():
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
        _still_serving(http, pngs)
    assert not failures, "\n".join(failures)


def test_body_over_the_size_cap_is_413(http, images):
    pngs, _ = images
    big = json.dumps({"image": "A" * (9 * 1024 * 1024)}).encode()
    r = http.post("/classify", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 8388608 bytes" in r.json()["error"]
    _still_serving(http, pngs)

    def chunks():  # no Content-Length: streamed (chunked) upload
        yield b'{"image": "'
        for _ in range(10):
            yield b"A" * (1024 * 1024)
        yield b'"}'

    r = http.post("/classify", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    _still_serving(http, pngs)


def test_other_media_types_are_415(http, images):
    pngs, _ = images  # (POST /classify also takes uploads: test_serving_uploads.py)
    r = http.post("/classify_batch", files={"image": ("x.png", pngs[0], "image/png")})
    assert r.status_code == 415 and "JSON" in r.json()["error"]
    r = http.post("/classify", content=b"\x80\x04K\x01.",
                  headers={"content-type": "application/vnd.bentoml+pickle"})
    assert r.status_code == 415
    _still_serving(http, pngs)


def test_a_burst_after_seconds_of_sequential_traffic_is_served(served_url, images):
    """BentoML 1.4's front-to-model connections go stale after 5 s idle (uvicorn) while its
    client keeps them 15 s: without the front's resend, most of this second burst was 500."""
    import time

    pngs, _ = images
    body = {"image": _b64(pngs[0]), "max_iter": 2}
    with httpx.Client(base_url=served_url, timeout=120) as c, ThreadPoolExecutor(8) as pool:
        def post(_):
            return c.post("/classify", json=body).status_code

        assert list(pool.map(post, range(8))) == [200] * 8
        start = time.monotonic()
        while time.monotonic() - start < 6.5:  # one connection busy, the others idle > 5 s
            assert post(0) == 200
        assert list(pool.map(post, range(8))) == [200] * 8


def test_a_burst_after_idle_keep_alive_is_served_without_any_internal_resend(
        served_url, served_log, images):
    """Two bursts of 32 concurrent requests around an idle pause longer than uvicorn's 5 s
    keep-alive: all 200, and the server's log holds no "resending" line. The model once ran
    behind pooled internal connections, which went stale in such pauses and had to be resent
    (25 of 64 requests of the second burst, measured)."""
    import time

    pngs, _ = images
    body = {"image": _b64(pngs[1]), "max_iter": 2}
    limits = httpx.Limits(max_connections=32)
    with (httpx.Client(base_url=served_url, timeout=120, limits=limits) as c,
          ThreadPoolExecutor(32) as pool):
        def post(_):
            return c.post("/classify", json=body).status_code

        assert list(pool.map(post, range(64))) == [200] * 64
        time.sleep(6)
        assert list(pool.map(post, range(64))) == [200] * 64
    log = served_log.read_text(errors="replace")
    assert "resending" not in log and "connection dropped" not in log


@pytest.mark.parametrize("how", ["env", "arg"])
def test_an_unusable_checkpoint_stops_the_server_with_a_clear_message(tmp_path, how):
    """Checked once before any worker starts (env DEQGUARD_CHECKPOINT or --arg checkpoint=)."""
    import os
    import subprocess
    import sys

    from deqguard.serving.launch import SERVICE, free_port

    missing = tmp_path / f"missing-{how}.safetensors"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DEQGUARD_CHECKPOINT": "/elsewhere",
           "BENTOML_HOME": str(tmp_path / "home")}  # its own metrics dir: see serving.launch
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1",
           "--port", str(free_port())]
    if how == "env":
        env["DEQGUARD_CHECKPOINT"] = str(missing)
    else:
        cmd += ["--arg", f"checkpoint={missing}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"checkpoint not found: {missing}" in proc.stdout + proc.stderr


def test_a_tampered_checkpoint_stops_the_server_before_any_worker(tmp_path, tiny_checkpoint):
    """The preflight checks the tensor hash too, so BentoML never restarts a failing worker."""
    import os
    import subprocess
    import sys

    from deqguard.serving.launch import SERVICE, free_port

    bad = tmp_path / "tampered.safetensors"
    data = bytearray(tiny_checkpoint.read_bytes())
    data[-3] ^= 0x55  # a tensor byte, at the end of the file
    bad.write_bytes(bytes(data))
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DEQGUARD_CHECKPOINT": str(bad),
           "BENTOML_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1",
           "--port", str(free_port())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "the file was altered or corrupted" in proc.stdout + proc.stderr
