"""The serving ladder (bench/ladder.py via `bench/serve.py --ladder`) and its framework floor
(bench/floor_service.py): the floor decodes like deqguard and sends the answer it is given, and the
ladder runs every row end to end (slow: it starts three real servers)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_bench
from pngs import png_bytes

REPO = Path(__file__).resolve().parents[1]
ROWS = ("floor", "deqguard+CNN", "deqguard+default", "in-process CNN", "in-process default")


def _floor_module():
    return load_bench("floor_service.py", "floor_service")


def test_floor_decodes_and_sends_the_given_answer_on_both_routes(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    answer = {"label": 2, "class_name": "c2", "probabilities": [0.1, 0.2, 0.7]}
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    monkeypatch.setenv("DEQGUARD_FLOOR_ANSWER", str(tmp_path / "answer.json"))
    png = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    with TestClient(app=_floor_module().Floor.to_asgi()) as client:
        r = client.post("/classify", json={"image": base64.b64encode(png).decode()})
        assert r.status_code == 200 and r.json() == answer
        r = client.post("/classify_upload", files={"image": ("x.png", png, "image/png")})
        assert r.status_code == 200 and r.json() == answer
        # It really decodes: bytes that are not an image are refused, not answered.
        bad = client.post("/classify", json={"image": base64.b64encode(b"not a png").decode()})
        assert bad.status_code >= 400


def test_floor_builtin_answer_has_deqguards_shape():
    from deqguard.serving.schema import ClassifyResult

    ans = _floor_module().builtin_answer()
    res = ClassifyResult.model_validate(ans)
    assert len(res.probabilities) == 10 and len(res.entropy) == len(res.residual) == 13


def _table(out: str) -> dict[tuple[str, str, int], list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ROWS:
            rows[(cells[0], cells[1], int(cells[2]))] = cells
    return rows


@pytest.mark.slow
def test_ladder_runs_every_row_end_to_end(tiny_checkpoint, tmp_path):
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "serve.py"), "--ladder", "--synthetic",
           "--cnn", str(tiny_checkpoint), "--model", str(tiny_checkpoint), "--requests", "4",
           "--rounds", "2", "--concurrency", "1,2", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    table = _table(out)
    for c in (1, 2):
        for name in ROWS:
            for fmt in (("-",) if name.startswith("in-process") else ("json", "multipart")):
                cells = table[(name, fmt, c)]
                assert float(cells[3]) > 0, cells  # median img/s
                lo, hi = (float(v) for v in cells[4].split("-"))
                assert lo <= float(cells[3]) <= hi, cells
        for fmt in ("json", "multipart"):
            line = next(x for x in out.splitlines() if x.startswith(f"| {c} | {fmt} |"))
            assert len(re.findall(r"\d+\.\d+x \[\d+\.\d+-\d+\.\d+\]", line)) == 4, line
    assert "2 rounds" in out
    assert "deqguard+CNN / floor" in out and "deqguard+default / in-process default" in out
    assert "cores: servers" in out and "client:" in out
    assert "load average at start" in out and "load average at end" in out
    # The floor sends a real deqguard answer: the same size, give or take a few digits.
    floor, dq = table[("floor", "json", 1)][7], table[("deqguard+default", "json", 1)][7]
    assert abs(int(floor) - int(dq)) <= 0.1 * int(dq), (floor, dq)
    for log in ("floor.log", "deqguard-cnn.log", "deqguard-default.log"):
        assert (tmp_path / "logs" / log).stat().st_size > 0

@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
def test_both_load_clients_send_the_same_requests(client, monkeypatch):
    """The ladder may load the servers from either client; both must send the body a deqguard
    route reads (JSON base64, or a multipart `image` file) and return the answer's bytes."""
    import asyncio

    from aiohttp import web

    spec = importlib.util.spec_from_file_location("ladder", REPO / "bench" / "ladder.py")
    ladder = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ladder", ladder)  # its dataclasses look themselves up
    spec.loader.exec_module(ladder)
    seen: list[tuple[str, bytes]] = []

    async def json_route(request: web.Request) -> web.Response:
        seen.append(("json", base64.b64decode((await request.json())["image"])))
        return web.json_response({"ok": 1})

    async def upload_route(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append(("multipart", form["image"].file.read()))
        return web.json_response({"ok": 2})

    async def run() -> list[bytes]:
        app = web.Application()
        app.add_routes([web.post("/classify", json_route), web.post("/up", upload_route)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        post = ladder._aiohttp_post if client == "aiohttp" else ladder._httpx_post
        try:
            async with post(f"http://127.0.0.1:{port}", 2) as send:
                return [await send("/classify", "json", b"P1", base64.b64encode(b"P1").decode()),
                        await send("/up", "multipart", b"P2", "unused")]
        finally:
            await runner.cleanup()

    bodies = asyncio.run(run())
    assert seen == [("json", b"P1"), ("multipart", b"P2")]
    assert [json.loads(b) for b in bodies] == [{"ok": 1}, {"ok": 2}]
