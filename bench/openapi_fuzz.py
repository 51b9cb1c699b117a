"""Schemathesis against a real server's /docs.json: no schema errors and no 5xx. Not a test (it
takes minutes and needs `pip install schemathesis`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/openapi_fuzz.py [--checkpoint default] [--examples 15]

Starts the service on 127.0.0.1 (serving.launch), runs `schemathesis run` with every check and a
bounded number of examples per operation, prints its report and whether the server still answers
/readyz. Expected leftovers are ST202 ("schema-valid request rejected") for bodies the schema
cannot rule out: random base64 that is no image, tensors of the wrong shape or type.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from deqguard.serving.launch import serve_subprocess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--examples", type=int, default=15)
    args = ap.parse_args()
    log = Path(tempfile.mkdtemp(prefix="deqguard-fuzz-")) / "server.log"
    with serve_subprocess(args.checkpoint, log, threads=1) as url:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", url + "/docs.json",
               "--max-examples", str(args.examples), "--checks", "all",
               "--request-timeout", "60", "--phases", "examples,coverage,fuzzing",
               "--workers", "1", "--no-color"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        print(proc.stdout[-12000:], proc.stderr[-2000:], sep="\n")
        print("server still ready:", httpx.get(url + "/readyz", timeout=30).status_code == 200)
        print("server log:", log)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
