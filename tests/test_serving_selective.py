"""Selective answers over real HTTP: `coverage` in JSON, multipart and raw requests, 422s for
invalid values, old checkpoints, GET /model, the OpenAPI document, the Python client,
`deqguard score --coverage` (locally and via --url) and the HTTP coverage benchmark."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pngs import png_bytes
from selective_ckpt import calibrated_copy, val_images

from deqguard.models import read_metadata
from deqguard.models.selective import selective_from_metadata

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sel-http")
    return calibrated_copy(tiny_checkpoint, folder / "tiny.safetensors")


@pytest.fixture(scope="module")
def sel_url(calibrated, tmp_path_factory):
    """A real server of the calibrated copy (torch backend, default settings)."""
    from serving_server import serve

    with serve(calibrated, tmp_path_factory.mktemp("sel-server") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def sel(sel_url):
    with httpx.Client(base_url=sel_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    """Held-out pattern images, clean and noisy: sure and doubtful answers."""
    x, _ = val_images(6)
    g = torch.Generator().manual_seed(2)
    noisy = (x[:3] + 0.6 * torch.rand(x[:3].shape, generator=g)).clamp(0, 1)
    return [png_bytes(a) for a in torch.cat([x, noisy]).numpy()]


def _json(http, png: bytes, **opts) -> httpx.Response:
    return http.post("/classify", json={"image": base64.b64encode(png).decode(), **opts})


def _multipart(http, png: bytes, **opts) -> httpx.Response:
    return http.post("/classify", files={"image": ("x.png", png, "image/png")},
                     data={k: str(v) for k, v in opts.items()})


def _raw(http, png: bytes, **opts) -> httpx.Response:
    return http.post("/classify", content=png, headers={"content-type": "image/png"},
                     params={k: str(v) for k, v in opts.items()})


FORMS = {"json": _json, "multipart": _multipart, "raw": _raw}


def test_coverage_in_json_multipart_and_raw_gives_the_same_answer(sel, pngs, calibrated):
    from deqguard.serving.images import decode_image
    from deqguard.serving.torch_engine import TorchEngine

    engine = TorchEngine.load(str(calibrated), device="cpu", threads=1)
    seen = set()
    for coverage in (0.3, 0.9):
        for png in pngs:
            want = _json(sel, png, coverage=coverage)
            assert want.status_code == 200, want.text
            body = want.json()
            for form in ("multipart", "raw"):
                got = FORMS[form](sel, png, coverage=coverage)
                assert got.status_code == 200, f"{form}: {got.text}"
                g = got.json()
                assert (g["label"], g["abstained"], g["iterations"]) == (
                    body["label"], body["abstained"], body["iterations"])
                assert g["selective"] == body["selective"]
            arr = decode_image(png, channels=1, height=28, width=28)[None]
            local = engine.classify(arr, engine.resolve(coverage=coverage))[0]
            assert local.abstained == body["abstained"]
            assert body["selective"]["score"] == pytest.approx(local.selective.score, abs=1e-6)
            assert body["selective"]["threshold"] == local.selective.threshold
            assert body["abstained"] == (body["selective"]["score"]
                                         > body["selective"]["threshold"])
            seen.add(body["abstained"])
    assert seen == {True, False}


BAD_VALUES = [("zero", 0), ("negative", -0.5), ("over one", 1.5), ("NaN", "nan"),
              ("a string", "most")]


@pytest.mark.parametrize("form", list(FORMS))
def test_invalid_coverage_is_422_in_every_form(sel, pngs, form):
    failures = []
    for name, value in BAD_VALUES:
        r = FORMS[form](sel, pngs[0], coverage=value)
        err = r.json().get("error", "") if r.headers.get("content-type", "").startswith(
            "application/json") else r.text
        if r.status_code != 422 or "coverage" not in err:
            failures.append(f"{name}: {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    assert _json(sel, pngs[0], max_iter=2).status_code == 200  # still serving


def test_invalid_coverage_is_422_on_every_route(sel, pngs):
    b64 = base64.b64encode(pngs[0]).decode()
    nan = b'{"image": "%s", "coverage": NaN}' % b64.encode()
    r = sel.post("/classify", content=nan, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "coverage" in r.json()["error"], r.text
    r = sel.post("/classify_batch", json={"images": [b64], "coverage": 0})
    assert r.status_code == 422 and "coverage" in r.json()["error"], r.text
    r = sel.post("/classify_tensor", json={"tensor": np.zeros((1, 1, 28, 28)).tolist(),
                                           "coverage": 2})
    assert r.status_code == 422 and "coverage" in r.json()["error"], r.text
    r = _json(sel, pngs[0], coverage=0.05)  # a number, but under what was calibrated
    assert r.status_code == 422 and "lowest calibrated coverage 0.1" in r.json()["error"]
    # other bad options keep their 400, also next to a bad coverage
    assert _json(sel, pngs[0], max_iter=0).status_code == 400
    assert _json(sel, pngs[0], max_iter=0, coverage=0).status_code == 400


def test_old_checkpoint_refuses_coverage_below_one_and_answers_at_one(http, pngs):
    """`http` is the shared server of the fixture checkpoint, which has no calibration."""
    for form, send in FORMS.items():
        r = send(http, pngs[0], coverage=0.9)
        assert r.status_code == 422, f"{form}: {r.text}"
        assert "needs a selective calibration" in r.json()["error"]
        ok = send(http, pngs[0], coverage=1)
        assert ok.status_code == 200, f"{form}: {ok.text}"
        assert ok.json()["abstained"] is False
        assert ok.json()["selective"] == {"coverage": 1.0, "score_name": None, "score": None,
                                          "threshold": None}
    assert _json(http, pngs[0]).json()["abstained"] is False


def test_realised_coverage_over_http_is_the_calibrated_one(sel, calibrated):
    """The calibration's own images, sent over HTTP: each stored coverage answers the share
    the calibration recorded (the threshold sits on one of these images' scores)."""
    cal = selective_from_metadata(read_metadata(calibrated))
    x, _ = val_images(cal.n_calibration)
    for c, realised in zip(cal.coverages, cal.realised, strict=True):
        if c in (0.5, 0.9):
            r = sel.post("/classify_tensor", json={"tensor": x.numpy().tolist(), "coverage": c})
            assert r.status_code == 200, r.text
            answered = np.mean([not a["abstained"] for a in r.json()])
            assert answered == pytest.approx(realised)
            assert abs(answered - c) <= 1 / cal.n_calibration


def test_model_endpoint_and_metrics_show_the_calibration(sel, calibrated, pngs):
    body = sel.get("/model").json()
    stored = read_metadata(calibrated).model_extra["selective"]
    assert body["selective"] == stored
    assert body["serving"]["selective"]["score"] == "max_softmax"
    assert body["serving"]["selective"]["min_coverage"] == 0.1
    _json(sel, pngs[3], coverage=0.1)
    assert "deqguard_abstained_answers_total" in sel.get("/metrics").text


def test_docs_json_stays_valid_openapi_and_documents_coverage(sel):
    from openapi_spec_validator import validate

    doc = sel.get("/docs.json").json()
    validate(doc)
    schemas = doc["components"]["schemas"]
    request = next(v for k, v in schemas.items() if k.startswith("ClassifyRequest"))
    cov = request["properties"]["coverage"]
    assert cov["minimum"] == 0 and cov["exclusiveMinimum"] is True and cov["maximum"] == 1
    params = {p["name"] for p in doc["paths"]["/classify"]["post"]["parameters"]}
    assert "coverage" in params


def test_python_client_sends_coverage_and_reads_the_answer(sel_url, served_url, pngs):
    from deqguard.clients import Client
    from deqguard.clients.client import ServerError, request_options

    with Client(sel_url) as c:
        low = c.classify(pngs[3], coverage=0.1)
        assert low.selective.coverage == 0.1 and low.selective.score_name == "max_softmax"
        assert low.abstained == (low.selective.score > low.selective.threshold)
        assert c.classify(pngs[3]).abstained is False
    for bad in (0, -1, 1.01, float("nan"), "most"):
        with pytest.raises(ValueError, match="coverage"):
            request_options({"coverage": bad})
    with Client(served_url) as c, pytest.raises(ServerError) as err:
        c.classify(pngs[0], coverage=0.5)
    assert err.value.status == 422 and "selective calibration" in err.value.message


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, pngs) -> Path:
    root = tmp_path_factory.mktemp("sel-images")
    for i, png in enumerate(pngs):
        (root / f"{i:02d}.png").write_bytes(png)
    return root


def test_score_rows_carry_abstained_locally_and_via_url(calibrated, sel_url, image_dir,
                                                         tmp_path, capsys):
    from deqguard.cli import main
    from deqguard.clients.rows import read_rows

    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    common = ["--coverage", "0.3", "--quiet", "--workers", "0"]
    assert main(["score", str(image_dir), "--out", str(local), "--checkpoint", str(calibrated),
                 *common, "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert main(["score", str(image_dir), "--out", str(remote), "--url", sel_url,
                 *common]) == 0
    a, b = read_rows(local), read_rows(remote)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["abstained"] for r in a] == [r["abstained"] for r in b]
    assert {r["abstained"] for r in a} == {True, False}
    assert f"abstained: {sum(r['abstained'] for r in a)}" in printed
    plain = tmp_path / "plain.jsonl"
    assert main(["score", str(image_dir), "--out", str(plain), "--checkpoint", str(calibrated),
                 "--quiet", "--workers", "0", "--threads", "1"]) == 0
    assert not any(r["abstained"] for r in read_rows(plain))


def test_http_coverage_benchmark_runs_against_the_server(sel_url, pattern_idx_dir, tmp_path):
    """bench/selective_http.py, the command that measures the issue's HTTP coverage target."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "selective_http.py"), "--url", sel_url,
         "--data-dir", str(pattern_idx_dir), "--n", "60", "--coverage", "0.5,1", "--json",
         str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    half, full = json.loads(out.read_text())
    assert half["n"] == 60 and half["score"] == "max_softmax" and half["threshold"] is not None
    assert half["answered"] == round(half["realised_coverage"] * 60) < 60
    assert full["realised_coverage"] == 1.0 and full["threshold"] is None
    assert "realised" in proc.stdout


def test_the_servers_budget_cuts_answers_and_selective_ones_abstain(calibrated, tmp_path):
    """A server with a 1 ms compute budget (over before the solve starts: the front -> model
    hop takes longer, as with deadline_ms=1): every answer says stopped='budget'; a selective
    request is answered, abstaining, not refused; the caller's own deadline_ms stays refused
    below coverage 1."""
    from serving_server import serve

    with serve(calibrated, tmp_path / "server.log", DEQGUARD_REQUEST_BUDGET_MS="1") as url, \
            httpx.Client(base_url=url, timeout=120) as c:
        assert c.get("/model").json()["serving"]["request_budget_ms"] == 1
        png = png_bytes(val_images(1)[0][0].numpy())
        for form, send in FORMS.items():
            r = send(c, png, coverage=0.9, max_iter=50, settle_iters=0)
            assert r.status_code == 200, f"{form}: {r.text}"
            a = r.json()
            assert (a["stopped"], a["iterations"], a["abstained"]) == ("budget", 1, True), form
        full = _json(c, png, max_iter=50, settle_iters=0).json()
        assert (full["stopped"], full["abstained"]) == ("budget", False)
        capped = _json(c, png, max_iter=50, settle_iters=0, deadline_ms=600_000).json()
        assert capped["stopped"] == "budget"
        own = _json(c, png, coverage=0.9, deadline_ms=50)
        assert own.status_code == 422 and "drop deadline_ms" in own.json()["error"]
