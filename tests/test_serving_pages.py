"""The pages the real server serves: / leads to the demo page, no page loads anything from outside
the server, and the server says where the page is once it is ready."""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from deqguard.serving.ui import DOCS, STATIC

# Attributes through which a page makes the browser fetch something.
_LOADING = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"),
            ("source", "src"), ("embed", "src"), ("object", "data"), ("video", "src"),
            ("audio", "src"), ("image", "href"), ("use", "href"), ("frame", "src")}
_URL = re.compile(r"""https?://[^\s"'`<>)]+""", re.IGNORECASE)
# Names, not fetches: XML namespaces are written as URLs.
_NAMESPACES = ("http://www.w3.org/",)
_CSS_URL = re.compile(r"""url\(\s*["']?([^"')\s]+)""", re.IGNORECASE)


class _Page(HTMLParser):
    """The URLs a page would load (attributes, inline CSS) and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.inline: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and ((tag, name) in _LOADING or name in ("srcset", "poster", "background")):
                self.loads.extend(v.split()[0] for v in value.split(",") if v.strip())
            if name == "style" and value:
                self.loads.extend(_CSS_URL.findall(value))
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.inline.append(data)
        elif self._in == "style":
            self.loads.extend(_CSS_URL.findall(data))


def outside_references(html: str, page_url: str) -> list[str]:
    """URLs outside the page's server that the page loads, or that its inline scripts name
    (a script that builds a URL to load, as a tag manager does, names it)."""
    parsed = _Page()
    parsed.feed(html)
    origin = urlsplit(page_url)[:2]
    bad = [u for u in parsed.loads
           if not u.startswith(("data:", "blob:", "#"))
           and urlsplit(urljoin(page_url, u))[:2] != origin]
    for script in parsed.inline:
        bad += [u for u in _URL.findall(script) if not u.startswith(_NAMESPACES)]
    return bad


def same_origin_loads(html: str, page_url: str) -> list[str]:
    parsed = _Page()
    parsed.feed(html)
    urls = [urljoin(page_url, u) for u in parsed.loads if not u.startswith(("data:", "blob:"))]
    return [u for u in urls if urlsplit(u)[:2] == urlsplit(page_url)[:2]]


def test_the_page_check_sees_what_bentomls_index_page_loads():
    """The check itself: BentoML's Swagger page loads Google Tag Manager from the network."""
    import _bentoml_impl.server as impl

    html = (Path(impl.__file__).parent / "main-openapi.html").read_text()
    bad = outside_references(html, "http://127.0.0.1:3000/")
    assert any("googletagmanager.com" in u for u in bad), bad
    assert outside_references('<img src="https://example.org/x.png">', "http://h:1/") \
        == ["https://example.org/x.png"]
    assert outside_references('<script src="app.js"></script><svg xmlns="http://www.w3.org/'
                              '2000/svg"></svg>', "http://h:1/ui/") == []


def test_root_redirects_to_the_ui_page(http):
    r = http.get("/", follow_redirects=False)
    assert r.status_code in (302, 303, 307, 308)
    assert r.headers["location"].rstrip("/").endswith("/ui")
    page = http.get("/", follow_redirects=True)
    assert page.status_code == 200 and "entropy-chart" in page.text
    assert str(page.url).endswith("/ui/")


def _served_pages(served_url: str) -> list[str]:
    """/, /ui, /docs, and every HTML file the package serves under them."""
    paths = ["/", "/ui", "/ui/", "/docs", "/docs/"]
    for folder, prefix in ((STATIC, "/ui/"), (DOCS, "/docs/")):
        paths += [prefix + p.relative_to(folder).as_posix() for p in folder.rglob("*.html")]
    return [served_url + p for p in paths]


def test_no_served_page_loads_anything_from_the_network(http, served_url):
    """Every HTML page the service serves refers only to this server, and everything it
    loads from this server is there."""
    pages = 0
    for url in _served_pages(served_url):
        r = http.get(url, follow_redirects=True)
        assert r.status_code == 200, url
        if "html" not in r.headers.get("content-type", ""):
            continue
        pages += 1
        final = str(r.url)
        assert outside_references(r.text, final) == [], final
        for asset in same_origin_loads(r.text, final):
            a = http.get(asset)
            assert a.status_code == 200, (final, asset)
            if asset.endswith((".css", ".js")) and "/docs/swagger/" not in asset:
                # our own scripts and styles: no fetch or url() of an outside address
                fetched = re.findall(r"""(?:fetch|import|url)\(\s*["'`]?(https?://[^"'`)\s]+)""",
                                     a.text)
                assert fetched == [], (asset, fetched)
    assert pages >= 3


def test_docs_page_is_swagger_ui_over_docs_json_without_the_validator(http):
    page = http.get("/docs/", follow_redirects=True)
    assert page.status_code == 200 and "swagger-ui" in page.text
    init = http.get("/docs/init.js").text
    assert "validatorUrl: null" in init and "docs.json" in init
    assert http.get("/docs.json").json()["paths"]


def test_the_server_says_where_the_page_is_once_ready(served_url, served_log):
    from deqguard.serving.service import ready_line

    want = ready_line(served_url)
    assert want.endswith(served_url + "/ui") and served_url in want.split("open")[0]
    deadline = time.monotonic() + 60  # /readyz answered already; the line follows within ~1 s
    while want not in served_log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"no line {want!r} in the server's output:\n"
                        + served_log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


@pytest.mark.parametrize("runner_map, url", [
    ('{"deqguard": "http://127.0.0.1:3000", "deqguard-model": "tcp://x"}',
     "http://127.0.0.1:3000"),
    ('{"deqguard": "https://localhost:8443/"}', "https://localhost:8443"),
    ("", None), ("{}", None), ("not json", None), ('["deqguard"]', None),
])
def test_public_url_comes_from_bentomls_runner_map(runner_map, url):
    from deqguard.serving.service import public_url

    assert public_url(runner_map) == url


def test_every_file_the_pages_serve_is_package_data():
    """A page file left out of pyproject's package-data would be missing from the wheel, and
    the installed service would answer 404 where the source tree serves it."""
    import tomllib

    from deqguard.serving import ui

    root = Path(ui.__file__).parent
    patterns = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml")
                             .read_text())["tool"]["setuptools"]["package-data"]
    patterns = patterns["deqguard.serving.ui"]
    files = [p.relative_to(root).as_posix() for folder in (STATIC, DOCS)
             for p in folder.rglob("*") if p.is_file()]
    assert any(f.startswith("docs/") for f in files)
    shipped = {p.relative_to(root).as_posix() for pat in patterns for p in root.glob(pat)}
    assert sorted(set(files) - shipped) == []
