"""``fastpix2pix serve`` in a real browser: headless Chromium opens the page, draws strokes and a rectangle,
and sees the output change; no request leaves 127.0.0.1.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``; ``.ci/run`` installs
them) and the ``selenium`` package (the Makefile's venv has it). Without Chromium the test is skipped,
saying so. To run it on another model and keep its screenshot (the README's):

    FASTPIX2PIX_SERVE_MODEL=checkpoints/demo FASTPIX2PIX_SERVE_SCREENSHOT=docs/serve.png \\
        .venv/bin/python -m pytest tests/test_serve_browser.py
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_fixtures import running_server, save_tiny_model, serve_options

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WAIT_SECONDS = 60
LOCAL_SCHEMES = ("blob:", "data:")


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) executables, or None. FASTPIX2PIX_CHROMIUM / _CHROMEDRIVER override."""
    browser = os.environ.get("FASTPIX2PIX_CHROMIUM") or next(
        (path for path in map(shutil.which, CHROMIUM_NAMES) if path), None
    )
    driver = os.environ.get("FASTPIX2PIX_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver; "
    ".ci/run installs them when it can)",
)


def _selenium() -> Any:
    try:
        import selenium.webdriver
    except ImportError:
        if os.environ.get("CI"):
            raise  # the Makefile's venv installs it: missing in CI is a set-up fault, not a reason to skip
        pytest.skip("the selenium package is not installed (pip install -e '.[dev]', or make test)")
    return selenium.webdriver


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    webdriver = _selenium()
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM is not None
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM[0]
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1180,820", "--no-first-run", "--disable-extensions", "--disable-sync",
        "--disable-background-networking", "--disable-component-update",
        # Every name resolves to nothing but 127.0.0.1: a stray request could not leave the machine.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMIUM[1]))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def model_options(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny model, or FASTPIX2PIX_SERVE_MODEL=CHECKPOINTS_DIR/NAME (e.g. the demo's)."""
    given = os.environ.get("FASTPIX2PIX_SERVE_MODEL")
    if given:
        run = Path(given)
        return serve_options(run.parent, name=run.name)
    checkpoints, _ = save_tiny_model(tmp_path_factory.mktemp("serve_browser"))
    return serve_options(checkpoints)


def wait_until(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {WAIT_SECONDS} s waiting for {what}")


def translations_done(driver: Any, more_than: int) -> int:
    """Wait until the page has shown more than ``more_than`` outputs and nothing is pending."""
    script = "return [Number(document.body.dataset.translations), document.body.dataset.busy];"

    def ready() -> int:
        count, busy = driver.execute_script(script)
        return count if count > more_than and busy == "false" else 0

    return wait_until(ready, f"translation number {more_than + 1}")


OUTPUT_PIXELS = """
const img = document.getElementById("output");
const c = document.createElement("canvas");
c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext("2d");
g.drawImage(img, 0, 0);
return [c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)];
"""
CANVAS_PIXEL = """
const [x, y] = arguments;
const d = document.getElementById("canvas").getContext("2d").getImageData(x, y, 1, 1).data;
return "#" + Array.from(d.slice(0, 3), (v) => v.toString(16).padStart(2, "0")).join("");
"""


def drag(driver: Any, canvas: Any, points: list[tuple[float, float]]) -> None:
    """Press at the first point, move through the others, release (points in canvas pixels)."""
    from selenium.webdriver.common.action_chains import ActionChains

    script = "const c = arguments[0]; c.scrollIntoView({block: 'nearest'}); return [c.width, c.height];"
    width, height = driver.execute_script(script, canvas)
    scale_x, scale_y = canvas.size["width"] / width, canvas.size["height"] / height

    def offset(point: tuple[float, float]) -> tuple[int, int]:  # from the element's centre, in CSS pixels
        return round((point[0] - width / 2) * scale_x), round((point[1] - height / 2) * scale_y)

    actions = ActionChains(driver).move_to_element_with_offset(canvas, *offset(points[0])).click_and_hold()
    previous = offset(points[0])
    for point in points[1:]:
        current = offset(point)
        actions.move_by_offset(current[0] - previous[0], current[1] - previous[1])
        previous = current
    actions.release().perform()


def click_button(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[normalize-space()='{text}']").click()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for, from the DevTools network events of the performance log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_draw_and_see_the_translation(browser: Any, model_options: Any, tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with running_server(model_options) as (app, server):
        base = server.url
        browser.get(base)
        count = translations_done(browser, 0)  # the sample (or the blank canvas) translated on load
        width, height, before = browser.execute_script(OUTPUT_PIXELS)
        size = app.info["canvas"]
        assert (width, height) == (size["width"], size["height"])
        palette = next(p for p in app.info["palettes"] if p["name"] == app.info["palette"])
        colours = {c["name"]: c["color"] for c in palette["classes"]}
        canvas = browser.find_element(By.ID, "canvas")
        w, h = width, height

        # Three brush strokes in the "window" colour, then a "door" rectangle.
        click_button(browser, "Brush")
        click_button(browser, "window")
        for row in (0.2, 0.35, 0.5):
            drag(browser, canvas, [(0.15 * w, row * h), (0.5 * w, row * h + 3), (0.85 * w, row * h)])
        click_button(browser, "Rectangle")
        click_button(browser, "door")
        drag(browser, canvas, [(0.3 * w, 0.65 * h), (0.5 * w, 0.8 * h), (0.7 * w, 0.95 * h)])
        assert browser.execute_script(CANVAS_PIXEL, round(0.5 * w), round(0.35 * h)) == colours["window"]
        assert browser.execute_script(CANVAS_PIXEL, round(0.5 * w), round(0.8 * h)) == colours["door"]

        count = translations_done(browser, count)
        _, _, after = browser.execute_script(OUTPUT_PIXELS)
        changed = sum(a != b for a, b in zip(before, after, strict=True)) / len(before)
        assert changed > 0.02, f"only {changed:.1%} of the output's values changed after drawing"
        latency = browser.find_element(By.ID, "latency").text
        assert latency.startswith("model ") and "round trip" in latency
        assert browser.find_element(By.ID, "status").text == ""  # no error shown
        browser.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("FASTPIX2PIX_SERVE_SCREENSHOT"):
            browser.save_screenshot(os.environ["FASTPIX2PIX_SERVE_SCREENSHOT"])

        click_button(browser, "Undo")  # takes the rectangle away again
        assert browser.execute_script(CANVAS_PIXEL, round(0.5 * w), round(0.8 * h)) != colours["door"]
        count = translations_done(browser, count)

        # Outline mode: a blank white page, a pen stroke in black.
        Select(browser.find_element(By.ID, "mode")).select_by_value("outline")
        assert browser.execute_script(CANVAS_PIXEL, 2, 2) == "#ffffff"
        drag(browser, canvas, [(0.2 * w, 0.5 * h), (0.8 * w, 0.5 * h)])
        assert browser.execute_script(CANVAS_PIXEL, round(0.5 * w), round(0.5 * h)) == "#000000"
        count = translations_done(browser, count)

        # An upload of another size: the canvas takes its size, the output comes back at that size.
        upload = tmp_path / "upload.png"
        Image.new("RGB", (200, 150), (255, 255, 255)).save(upload)
        browser.find_element(By.ID, "upload").send_keys(str(upload))
        translations_done(browser, count)
        assert browser.execute_script(OUTPUT_PIXELS)[:2] == [200, 150]
        assert "reflect-padded" in browser.find_element(By.ID, "input-size").text

        urls = requested_urls(browser)
        assert any(u == f"{base}translate" for u in urls) and any(u == f"{base}info" for u in urls)
        strays = [u for u in urls if not u.startswith(base) and not u.startswith(LOCAL_SCHEMES)]
        assert not strays, f"requests left {base}: {strays}"
        problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not problems, problems  # no script error, no blocked (non-local) resource
    assert (tmp_path / "serve.png").stat().st_size > 0
