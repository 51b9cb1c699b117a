"""The framework floor: a minimal BentoML service that decodes like deqguard and answers like it,
without any model. Not part of the product; `bench/serve.py --ladder` serves it.

    BENTOML_DO_NOT_TRACK=true bentoml serve floor_service:Floor --working-dir bench

Whatever deqguard adds on top of this (validation, the micro-batching of the model calls, the
model itself) is the gap between a deqguard row and this row in the ladder, so the floor does the
same decoding (`decode_image`, PIL) and sends an answer of the same shape and size:
DEQGUARD_FLOOR_ANSWER names a JSON file holding a real deqguard answer (the ladder writes one),
else a built-in answer of deqguard's shape (10 probabilities, 13-step trajectories) is sent.

POST /classify takes deqguard's JSON body ({"image": base64}); POST /classify_upload takes a
multipart upload with the file field `image`, parsed by BentoML itself (its own way to take
files: one route cannot take both in BentoML without deqguard's upload middleware).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from starlette.responses import JSONResponse

from deqguard.serving.images import decode_b64, decode_image

CHANNELS = int(os.environ.get("DEQGUARD_FLOOR_CHANNELS", "1"))
SIZE = int(os.environ.get("DEQGUARD_FLOOR_SIZE", "28"))
STEPS = 13


def builtin_answer() -> dict[str, Any]:
    """deqguard's answer shape with fixed values: what a default request on Fashion-MNIST gets
    (10 classes, a 13-step solve, detection and selective blocks, the model reference)."""
    return {
        "label": 8, "class_name": "Bag",
        "probabilities": [0.0079889606465676, 0.0002689459532928, 0.0070105557250287,
                          0.0001242642061534, 0.0004972929496776, 0.0009712825475599,
                          0.0379521915163365, 0.0008391866979719, 0.9437768383977916,
                          0.0005704813596193],
        "entropy": [1.273053765296936 / (k + 1) for k in range(STEPS)],
        "residual": [0.728591799736023 ** k for k in range(STEPS)],
        "iterations": STEPS, "converged": True, "stopped": "tol",
        "detection": {"score_name": "dynamics-logistic", "score": 0.4625082247593769,
                      "threshold": 0.5496868760907261, "suspicious": False,
                      "detector": "dynamics-logistic", "fpr": 0.05},
        "abstained": False,
        "selective": {"coverage": 1.0, "score_name": "max_softmax",
                      "score": 0.05622321367263794, "threshold": None},
        "model": {"name": "floor",
                  "sha256": "f13d103ccbf39a352d44062d9d0f213176f73f0e9e9cec4d167105dccda84d75"},
    }


def load_answer() -> dict[str, Any]:
    path = os.environ.get("DEQGUARD_FLOOR_ANSWER")
    return json.loads(Path(path).read_text()) if path else builtin_answer()


def _decode(data: bytes) -> None:
    decode_image(data, channels=CHANNELS, height=SIZE, width=SIZE)


# As deqguard's front: one worker, access log on, async routes that decode small images inline
# and answer with a Starlette JSONResponse (compact JSON, BentoML's output serde bypassed).
@bentoml.service(name="deqguard-floor", workers=1, traffic={"timeout": 300})
class Floor:
    """Decode, then answer a constant: the cost of BentoML plus deqguard's image decoding."""

    def __init__(self) -> None:
        self.answer = load_answer()

    @bentoml.api(route="/classify")
    async def classify(self, image: str) -> dict[str, Any]:
        _decode(decode_b64(image))
        return JSONResponse(self.answer)

    @bentoml.api(route="/classify_upload")
    async def classify_upload(self, image: Annotated[Path, ContentType("image/png")]
                              ) -> dict[str, Any]:
        _decode(Path(image).read_bytes())
        return JSONResponse(self.answer)
