"""The web pages the service serves: /ui (the demo page), /docs (the API page), and / -> /ui.

Static files only, nothing fetched from the network at run time (no CDN, no analytics): a page
that loaded a script from elsewhere would leak each visit and break on an offline machine.
BentoML's own index page (Swagger UI) pulls Google Tag Manager from the network, so `/` is
redirected to the demo page, and /docs serves the Swagger UI files that ship inside the bentoml
package (pinned with it) with our own initializer: the validator badge, which Swagger UI loads
from validator.swagger.io by default, is turned off there.

The demo page (static/) posts the image to POST /classify as multipart/form-data, the upload form
people use, and draws entropy and residual per solver iteration as inline SVG. static/examples/
holds Fashion-MNIST test images, clean and PGD-attacked, each chosen for the role its caption
states (examples.py) by bench/ui_examples.py running the served engine on the shipped default.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
DOCS = Path(__file__).resolve().parent / "docs"
UI_PATH = "/ui"


def swagger_assets() -> Path | None:
    """Swagger UI's JS and CSS as the bentoml package ships them, or None where it has none."""
    try:
        from bentoml._internal import server
    except ImportError:
        return None
    folder = Path(server.__file__).resolve().parent / "static_content"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def ui_app() -> StaticFiles:
    """The ASGI app serving static/ (index.html at the mount's root)."""
    return StaticFiles(directory=STATIC, html=True)


async def _to_ui(request: Request) -> RedirectResponse:
    return RedirectResponse(UI_PATH + "/", status_code=307)


def page_routes() -> list[BaseRoute]:
    """Routes for the service's own Starlette app: /, /ui/, /docs/ (and its Swagger files)."""
    routes: list[BaseRoute] = [Route("/", _to_ui, methods=["GET", "HEAD"]),
                               Mount(UI_PATH, app=ui_app(), name="ui")]
    assets = swagger_assets()
    if assets is not None:
        routes.append(Mount("/docs/swagger", app=StaticFiles(directory=assets),
                            name="swagger"))
    routes.append(Mount("/docs", app=StaticFiles(directory=DOCS, html=True), name="docs"))
    return routes
