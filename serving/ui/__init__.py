"""The web page at /ui: pick or drop an image, see the prediction and its trajectories.

Static files only (static/: HTML, JS, CSS, no CDN, nothing fetched from the network at run time),
served by the same BentoML service through its mounted Starlette app (service.py). The page
posts the image to POST /classify as multipart/form-data, the upload form people use, and draws
entropy and residual per solver iteration as inline SVG. static/examples/ holds Fashion-MNIST
test images, clean and PGD-attacked, made by bench/ui_examples.py with the project's own attack
code against the shipped default, so a visitor can compare trajectories without files of their own.
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def ui_app() -> StaticFiles:
    """The ASGI app serving static/ (index.html at the mount's root)."""
    return StaticFiles(directory=STATIC, html=True)
