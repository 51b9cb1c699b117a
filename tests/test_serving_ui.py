"""The /ui page in a real browser: headless Chromium driven by Selenium against a real server of
the shipped default. Skips (with the reason) where Chromium, its driver or selenium is missing;
`make test` installs the Debian packages `chromium` and `chromium-driver` when it can.

The README's screenshot comes from this test (the page after a click on the caught-attack
example): run it with DEQGUARD_UI_SCREENSHOT=docs/ui.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from deqguard.serving.ui import STATIC

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not CHROMIUM or not DRIVER:
        return ("headless Chromium not found: install the Debian packages chromium and "
                "chromium-driver (make test does, as root)")
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def default_url(tmp_path_factory):
    """A real server of the shipped default checkpoint (the page's bundled examples are
    Fashion-MNIST images attacked on it)."""
    from serving_server import serve

    with serve("default", tmp_path_factory.mktemp("ui") / "server.log") as url:
        yield url


def open_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's requests
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1250", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)


def classify_on_page(url: str, image: Path, screenshot: Path, timeout: float = 120) -> dict:
    """Open /ui, upload `image`, wait for the answer; what the page shows, and a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = open_browser()
    try:
        driver.get(url + "/ui/")
        wait = WebDriverWait(driver, timeout)
        wait.until(lambda d: "backend" in d.find_element(By.ID, "model-info").text)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#examples button")))
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-state")
                   in ("done", "error"))
        out = {
            "state": driver.find_element(By.ID, "output").get_attribute("data-state"),
            "status": driver.find_element(By.ID, "status").text,
            "prediction": driver.find_element(By.ID, "prediction").text,
            "entropy_points": len(driver.find_elements(By.CSS_SELECTOR,
                                                       "#entropy-chart circle.pt")),
            "residual_points": len(driver.find_elements(By.CSS_SELECTOR,
                                                        "#residual-chart circle.pt")),
            "suspicious": driver.find_element(By.ID, "suspicious").text,
        }
        driver.save_screenshot(str(screenshot))
        return out
    finally:
        driver.quit()


def test_upload_on_the_page_shows_the_answer_and_both_trajectories(default_url, tmp_path):
    index = json.loads((STATIC / "examples" / "index.json").read_text())
    example = next(e for e in index["examples"] if e["attacked"])
    image = STATIC / "examples" / example["file"]
    shot = tmp_path / "ui.png"
    seen = classify_on_page(default_url, image, shot)
    assert seen["state"] == "done", seen["status"]
    answer = httpx.post(default_url + "/classify",
                        files={"image": (image.name, image.read_bytes(), "image/png")},
                        timeout=120).json()
    assert seen["prediction"] == answer["class_name"]
    n = len(answer["entropy"])
    assert n >= 1 and seen["entropy_points"] == n and seen["residual_points"] == n
    assert seen["suspicious"] == ("SUSPICIOUS" if answer["detection"]["suspicious"]
                                  else "not suspicious")
    assert shot.stat().st_size > 10_000


def test_each_example_on_the_page_shows_what_its_caption_says(default_url, tmp_path):
    """A click on each bundled example sends the request its caption describes and shows the
    recorded answer: the flag for caught attacks and false alarms, none for the clean answer
    and the missed attack, ABSTAINED for the abstention."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    index = json.loads((STATIC / "examples" / "index.json").read_text())
    # the caught attack last: the README's screenshot shows it
    examples = sorted(index["examples"], key=lambda e: e["role"] == "caught")
    driver = open_browser()
    try:
        driver.get(default_url + "/")  # the root leads to the page
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "backend" in d.find_element(By.ID, "model-info").text)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples button"))
                   == len(examples))
        for ex in examples:
            driver.execute_script("document.getElementById('output').dataset.state = 'empty'")
            driver.find_element(By.CSS_SELECTOR, f'#examples button[data-file="{ex["file"]}"]'
                                ).click()
            wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-state")
                       in ("done", "error"))
            status = driver.find_element(By.ID, "status").text
            assert driver.find_element(By.ID, "output").get_attribute("data-state") == "done", \
                status
            assert ex["file"] in status
            assert driver.find_element(By.ID, "example-caption").text == ex["caption"]
            abstains = ex["role"] == "abstained"
            want = ex["answer_at_coverage"] if abstains else ex["answer"]
            assert driver.find_element(By.ID, "prediction").text == want["class_name"], ex["file"]
            flag = driver.find_element(By.ID, "suspicious").text
            assert flag == ("SUSPICIOUS" if want["detection"]["suspicious"]
                            else "not suspicious"), ex["file"]
            assert (driver.find_element(By.ID, "abstained").text == "ABSTAINED") == abstains
            assert ex["title"] in driver.find_element(
                By.CSS_SELECTOR, f'#examples button[data-file="{ex["file"]}"]').text
        assert examples[-1]["role"] == "caught"
        shot = tmp_path / "ui.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("DEQGUARD_UI_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["DEQGUARD_UI_SCREENSHOT"])
    finally:
        driver.quit()


def _requests(driver) -> list[str]:
    """Every URL the browser's pages asked for since the last call (Chrome's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def test_the_pages_fetch_nothing_from_outside_the_server(default_url):
    """In a real browser: /, the page with an answer drawn, and the API page (Swagger UI
    rendered from /docs.json) request only this server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = open_browser()
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(default_url + "/")
        wait.until(lambda d: "backend" in d.find_element(By.ID, "model-info").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button"))
        driver.find_element(By.CSS_SELECTOR, "#examples button").click()
        wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-state")
                   == "done")
        driver.get(default_url + "/docs")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
        urls = _requests(driver)
    finally:
        driver.quit()
    for want in ("/ui/app.js", "/ui/examples/index.json", "/classify", "/docs.json",
                 "/docs/swagger/swagger-ui-bundle.js"):
        assert any(u.startswith(default_url) and want in u for u in urls), (want, urls)
    outside = [u for u in urls if not u.startswith((default_url + "/", "data:", "blob:"))]
    assert outside == [], outside


@pytest.fixture(scope="module")
def selective_url(tiny_checkpoint, tmp_path_factory):
    """A real server of the fixture checkpoint with a selective calibration (max_softmax)."""
    from selective_ckpt import calibrated_copy
    from serving_server import serve

    path = calibrated_copy(tiny_checkpoint, tmp_path_factory.mktemp("ui-sel") / "tiny.safetensors")
    with serve(path, tmp_path_factory.mktemp("ui-sel-log") / "server.log") as url:
        yield url


def _doubtful_png(url: str, coverage: float, folder: Path) -> tuple[Path, dict]:
    """A held-out pattern image (or a noisy twin) the server abstains on at `coverage`."""
    import torch
    from pngs import png_bytes
    from selective_ckpt import val_images

    x, _ = val_images(8)
    noisy = (x + 0.6 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    for i, arr in enumerate(torch.cat([noisy, x]).numpy()):
        png = png_bytes(arr)
        answer = httpx.post(url + "/classify", files={"image": ("x.png", png, "image/png")},
                            data={"coverage": str(coverage)}, timeout=120).json()
        if answer["abstained"]:
            path = folder / f"doubtful-{i}.png"
            path.write_bytes(png)
            return path, answer
    raise AssertionError("no test image abstained: the fixture's calibration changed?")


def test_coverage_on_the_page_shows_an_abstained_answer_as_such(selective_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, answer = _doubtful_png(selective_url, 0.5, tmp_path)
    driver = open_browser()
    try:
        driver.get(selective_url + "/ui/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "backend" in d.find_element(By.ID, "model-info").text)
        assert "selective: max_softmax" in driver.find_element(By.ID, "model-info").text

        def classify(coverage: str) -> dict:
            field = driver.find_element(By.ID, "coverage")
            field.clear()
            field.send_keys(coverage)
            driver.execute_script("document.getElementById('output').dataset.state = 'empty'")
            if driver.find_element(By.ID, "classify").is_enabled():
                driver.find_element(By.ID, "classify").click()
            else:
                driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-state")
                       in ("done", "error"))
            pred = driver.find_element(By.ID, "prediction")
            return {"state": driver.find_element(By.ID, "output").get_attribute("data-state"),
                    "status": driver.find_element(By.ID, "status").text,
                    "prediction": pred.text, "struck": "abstained" in pred.get_attribute("class"),
                    "flag": driver.find_element(By.ID, "abstained").text,
                    "selective": driver.find_element(By.ID, "selective").text}

        low = classify("0.5")
        assert low["state"] == "done", low["status"]
        assert low["flag"] == "ABSTAINED" and low["struck"]
        assert low["prediction"] == answer["class_name"]  # the best guess is still shown
        assert f"{answer['selective']['threshold']:.4f}" in low["selective"]
        driver.save_screenshot(str(tmp_path / "abstained.png"))
        full = classify("1")
        assert full["state"] == "done", full["status"]
        assert full["flag"] == "answered" and not full["struck"]
    finally:
        driver.quit()
