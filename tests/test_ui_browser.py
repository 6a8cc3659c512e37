"""The page at / in a real browser: Debian's headless Chromium, driven by Playwright, against
a server on the trained model. Strokes drawn on #digit make a 1 and a 7; a real test image
picked from the page is answered as the server answers its pixels; a version can be
pinned; /docs renders the API from the package's own files. Nothing leaves the machine:
the browser's requests to anywhere but the server are refused and fail the test.

Skips, with the reason, where Playwright or Chromium is missing or cannot start (CI
installs both: .ci/run).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from .support import ServerProcess, native

CHROMIUM = Path("/usr/bin/chromium")
# This machine has no network: nothing in the background may try to reach out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SIDE = 28


@pytest.fixture(scope="module")
def served_page(
    trained_model_dir: Path, mnist_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The trained model as versions 1 and 2 (same weights), and test images to offer."""
    model_dir = tmp_path_factory.mktemp("page") / "mnist"
    for version in ("1", "2"):
        shutil.copytree(trained_model_dir / "1", model_dir / version)
    server = ServerProcess(
        model_dir,
        "--poll-interval", "0",
        "--version-policy", "all",
        "--ui-samples", str(mnist_path),
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright's Python package is not installed"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
        except sync_api.Error as error:
            pytest.skip(f"headless Chromium cannot start here: {str(error)[:500]}")
        yield chromium
        chromium.close()


def confined(page: Any, server: ServerProcess) -> list[str]:
    """Let `page` reach only the server: every other request is aborted and listed."""
    outside: list[str] = []
    netloc = urlsplit(server.http_url).netloc

    def only_the_server(route: Any) -> None:
        if urlsplit(route.request.url).netloc == netloc:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    return outside


@pytest.fixture
def page(browser: Any, served_page: ServerProcess) -> Iterator[Any]:
    """A fresh page on / that has finished loading, whose requests stay on the server."""
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    outside = confined(page, served_page)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(served_page.http_url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not outside, f"the page reached outside the server: {outside}"
    assert not errors, f"JavaScript errors: {errors}"


def draw(page: Any, *strokes: list[tuple[float, float]]) -> None:
    """Mouse strokes on #digit; points are fractions of the canvas' side."""
    box = page.locator("#digit").bounding_box()

    def at(point: tuple[float, float]) -> tuple[float, float]:
        return box["x"] + point[0] * box["width"], box["y"] + point[1] * box["height"]

    for stroke in strokes:
        page.mouse.move(*at(stroke[0]))
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*at(point), steps=12)
        page.mouse.up()


def shown(page: Any, source: str) -> int:
    """The class the page shows once it has answered for `source`."""
    page.wait_for_selector(f'#predicted-class[data-source="{source}"]')
    return int(page.inner_text("#predicted-class"))


def sent_pixels(page: Any) -> np.ndarray:
    return np.array(page.evaluate("window.mnistPage.lastInput"), dtype=np.uint8).reshape(
        1, SIDE, SIDE
    )


def test_drawn_strokes_are_prepared_as_mnist_digits_and_classified(
    page: Any, served_page: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A short 1, off to the left: the preparation scales and centres it.
    draw(page, [(0.2, 0.15), (0.22, 0.55)])
    assert shown(page, "drawing:1") == 1
    one = sent_pixels(page)
    page.click("#clear")
    assert page.inner_text("#predicted-class") == "\N{EN DASH}"  # nothing shown
    # A 7: the top bar, then the diagonal.
    draw(page, [(0.25, 0.2), (0.75, 0.2)], [(0.75, 0.2), (0.42, 0.85)])
    assert shown(page, "drawing:2") == 7
    seven = sent_pixels(page)
    for image, digit in ((one, 1), (seven, 7)):
        # What the page shows is the server's answer for what the page sent.
        assert native(served_page.target, image)[1].tolist() == [digit]
        # MNIST's preparation: the ink fits a 20x20 box and its mass is at the centre.
        rows, cols = np.nonzero(image[0] > 25)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 21
        weights = image[0].astype(float)
        centres = np.indices((SIDE, SIDE)) + 0.5  # each pixel's (row, column) centre
        mass = [(centres[axis] * weights).sum() / weights.sum() for axis in (0, 1)]
        assert np.allclose(mass, SIDE / 2, atol=0.75), mass
    bars = page.locator("#bars li .value").all_inner_texts()
    assert len(bars) == 10
    assert sum(float(text.rstrip("%")) for text in bars) == pytest.approx(100, abs=1)
    screenshot = tmp_path_factory.mktemp("screenshots") / "digit-page.png"
    page.screenshot(path=str(screenshot), full_page=True, animations="disabled")
    print(f"\nscreenshot of the page: {screenshot}")


def test_a_picked_test_image_shows_the_servers_answer_for_its_pixels(
    page: Any, served_page: ServerProcess, mnist_path: Path
) -> None:
    with urllib.request.urlopen(served_page.http_url + "/ui/samples.json", timeout=30) as answer:
        samples = json.loads(answer.read())["samples"]
    assert len(samples) == 30
    assert [s["label"] for s in samples[:10]] == list(range(10))
    with np.load(mnist_path) as data:
        x_test, y_test = data["x_test"], data["y_test"]
    for sample in samples:  # the page offers the data set's own test images
        assert sample["label"] == y_test[sample["index"]]
        assert sample["pixels"] == x_test[sample["index"]].ravel().tolist()
    sample = samples[17]  # a 7
    page.click(f'#samples button[data-index="{sample["index"]}"]')
    got = shown(page, f"sample:{sample['index']}")
    pixels = np.array(sample["pixels"], dtype=np.uint8).reshape(1, SIDE, SIDE)
    np.testing.assert_array_equal(sent_pixels(page), pixels)
    assert got == native(served_page.target, pixels)[1][0]
    assert "chosen" in (page.get_attribute(f'[data-index="{sample["index"]}"]', "class") or "")


def test_the_page_lists_the_loaded_versions_and_pins_one(page: Any) -> None:
    options = page.locator("#version option").all_inner_texts()
    assert options == ["newest (2)", "2", "1"]
    assert "loaded: 2, 1" in page.inner_text("#loaded-versions")
    draw(page, [(0.5, 0.15), (0.5, 0.85)])
    shown(page, "drawing:1")
    assert page.inner_text("#answered-by") == "answered by version 2"
    page.select_option("#version", "1")
    page.wait_for_function(
        "document.getElementById('answered-by').textContent === 'answered by version 1'"
    )
    assert page.inner_text("#endpoint") == "POST /v2/models/mnist/versions/1/infer"


def test_the_api_docs_render_offline(
    browser: Any, served_page: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    context = browser.new_context()
    page = context.new_page()
    outside = confined(page, served_page)
    page.goto(served_page.http_url + "/docs")
    page.wait_for_selector(".opblock")
    operations = page.locator(".opblock").count()
    title = page.inner_text(".info .title")
    screenshot = tmp_path_factory.mktemp("screenshots") / "docs-page.png"
    page.screenshot(path=str(screenshot), animations="disabled")
    print(f"\nscreenshot of /docs: {screenshot}")
    context.close()
    with urllib.request.urlopen(served_page.http_url + "/openapi.json", timeout=30) as answer:
        document = json.load(answer)
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    declared = sum(len(methods & set(item)) for item in document["paths"].values())
    assert declared >= 16  # TF Serving REST, v2 REST, feedback, health, metrics
    assert operations == declared  # every operation of the document is on the page
    assert "mnist-serving HTTP API" in title
    assert not outside, outside
