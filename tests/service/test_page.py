"""The canvas demo page in a real browser (Chromium driven by Playwright) against the real server.

Digits are drawn with the mouse (and once with touch) as strokes along polylines, so these tests
cover the whole path: pointer events, the canvas, the PNG upload, the server's preprocessing,
the committed model and the page's display of the answer.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "screenshot.png"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
PREDICT_ROUTE = "**/v1/predict/image**"

pytestmark = pytest.mark.browser

Point = tuple[float, float]
Stroke = list[Point]

expect.set_options(timeout=10_000)


# ------------------------------------------------------------------ shapes


def polyline(*corners: Point, steps: int = 8) -> Stroke:
    """The corners joined by straight segments, each cut into `steps` moves."""
    points = [corners[0]]
    for (x0, y0), (x1, y1) in itertools.pairwise(corners):
        points += [(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps) for i in range(1, steps + 1)]
    return points


def ellipse(rx: float, ry: float, n: int = 36) -> Stroke:
    """A closed ellipse around (0, 0), starting at the top like a hand-drawn 0."""
    return [(rx * math.sin(2 * math.pi * i / n), -ry * math.cos(2 * math.pi * i / n)) for i in range(n + 2)]


# Digits in a unit box centred on (0, 0): x and y in -0.5..0.5, y downwards.
ONE = [polyline((0.04, -0.5), (-0.04, 0.5))]
SEVEN = [polyline((-0.32, -0.45), (0.32, -0.45), (-0.08, 0.5))]
ZERO = [ellipse(0.3, 0.48)]
SEVEN_BAR = [polyline((-0.4, -0.5), (0.04, -0.5))]  # a top bar that turns ONE into a 7


def place(strokes: list[Stroke], centre: Point, size: float) -> list[Stroke]:
    """Unit-box strokes scaled to `size` (a fraction of the canvas side) around `centre`."""
    cx, cy = centre
    return [[(cx + x * size, cy + y * size) for x, y in stroke] for stroke in strokes]


# ---------------------------------------------------------------- fixtures


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real service on a free loopback port, serving the committed model; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within 90 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install it (apt-get install chromium), set CHROMIUM_PATH, "
            "or deselect these tests with -m 'not browser'"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(browser: Browser, base: str, **context_options: Any) -> Iterator[Page]:
    """A page in a fresh browser context, loaded and connected; fails on any JavaScript error."""
    context = browser.new_context(base_url=base, **context_options)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto("/")
    expect(page.get_by_test_id("status")).to_have_attribute("data-state", "ok")
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """A desktop-sized page on a high-DPI (2x) screen, loaded and connected."""
    with open_page(browser, server, viewport={"width": 1024, "height": 800}, device_scale_factor=2) as page:
        yield page


# ----------------------------------------------------------------- helpers


def canvas_box(page: Page) -> dict[str, float]:
    box = page.get_by_test_id("canvas").bounding_box()
    assert box is not None
    return box


def to_screen(box: dict[str, float], point: Point) -> Point:
    return box["x"] + point[0] * box["width"], box["y"] + point[1] * box["height"]


def draw(page: Page, strokes: list[Stroke], *, release: bool = True) -> None:
    """Draw the strokes (in fractions of the canvas side) with the mouse, button held along each."""
    box = canvas_box(page)
    for index, stroke in enumerate(strokes):
        page.mouse.move(*to_screen(box, stroke[0]))
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*to_screen(box, point))
        if release or index < len(strokes) - 1:
            page.mouse.up()


def canvas_is_blank(page: Page) -> bool:
    """True when no pixel of the drawing canvas is darker than mid-grey."""
    return page.get_by_test_id("canvas").evaluate(
        """canvas => {
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            for (let i = 0; i < data.length; i += 4) if (data[i] < 128) return false;
            return true;
        }"""
    )


def preview_ink(page: Page) -> int:
    """How many pixels of the 28x28 preview are lit."""
    return page.get_by_test_id("preview").evaluate(
        """canvas => {
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let lit = 0;
            for (let i = 0; i < data.length; i += 4) if (data[i] > 64) lit += 1;
            return lit;
        }"""
    )


def wait_until(page: Page, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for a Python-side condition (such as a route handler having run) while Playwright works."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        page.wait_for_timeout(20)


def expect_no_prediction(page: Page) -> None:
    expect(page.get_by_test_id("prediction")).to_have_text("")
    expect(page.get_by_test_id("confidence")).to_have_text("")
    expect(page.get_by_test_id("result")).to_have_attribute("aria-busy", "false")


def fake_answer(probabilities: list[float]) -> str:
    digit = max(range(10), key=lambda d: probabilities[d])
    return json.dumps(
        {
            "digit": digit,
            "confidence": probabilities[digit],
            "probabilities": probabilities,
            "input": [[0.0] * 28 for _ in range(28)],
            "model": {"name": "mnist-cnn", "version": 1},
        }
    )


# ------------------------------------------------------------------- tests


def test_a_blank_page_shows_the_canvas_and_no_prediction(page: Page) -> None:
    expect(page.get_by_test_id("canvas")).to_be_visible()
    expect(page.get_by_test_id("prediction")).to_have_text("")
    expect(page.get_by_test_id("probabilities").locator("[data-testid^='prob-']")).to_have_count(10)
    expect(page.get_by_test_id("status")).to_contain_text("Ready")
    assert canvas_is_blank(page)
    assert preview_ink(page) == 0


def test_the_canvas_is_sharp_on_high_dpi_screens_and_draws_round_thick_strokes(page: Page) -> None:
    size = page.get_by_test_id("canvas").evaluate(
        "c => ({w: c.width, h: c.height, css: c.getBoundingClientRect().width, touch: getComputedStyle(c).touchAction})"
    )
    assert size["w"] == size["h"] == round(size["css"] * 2)
    assert size["touch"] == "none"
    draw(page, [polyline((0.2, 0.5), (0.8, 0.5))])
    # The stroke is about 1/13 of the side thick, measured down the middle of the canvas.
    thickness = page.get_by_test_id("canvas").evaluate(
        """c => {
            const column = c.getContext("2d").getImageData(Math.round(c.width / 2), 0, 1, c.height).data;
            let dark = 0;
            for (let i = 0; i < column.length; i += 4) if (column[i] < 128) dark += 1;
            return dark / c.height;
        }"""
    )
    assert 1 / 16 < thickness < 1 / 11


@pytest.mark.parametrize(
    ("digit", "strokes"),
    [
        ("1", place(ONE, (0.5, 0.5), 0.7)),
        ("1", place(ONE, (0.25, 0.3), 0.35)),
        ("7", place(SEVEN, (0.5, 0.5), 0.7)),
        ("7", place(SEVEN, (0.7, 0.72), 0.4)),
        ("0", place(ZERO, (0.5, 0.5), 0.75)),
        ("0", place(ZERO, (0.3, 0.7), 0.4)),
    ],
    ids=["1-large", "1-small-top-left", "7-large", "7-small-bottom-right", "0-large", "0-small-bottom-left"],
)
def test_a_drawn_digit_is_recognised(page: Page, digit: str, strokes: list[Stroke]) -> None:
    draw(page, strokes)
    expect(page.get_by_test_id("prediction")).to_have_text(digit)
    expect(page.get_by_test_id("confidence")).to_have_text(re.compile(r"confidence \S+%|not sure: \d or \d\?"))
    expect(page.get_by_test_id(f"prob-{digit}")).to_have_class(re.compile(r"\btop\b"))
    expect(page.get_by_test_id(f"prob-{digit}")).to_contain_text("%")
    assert preview_ink(page) > 20  # the preview shows what the model saw


def test_recognition_is_live_while_the_pen_is_still_down(page: Page) -> None:
    draw(page, place(SEVEN, (0.5, 0.5), 0.7), release=False)
    expect(page.get_by_test_id("prediction")).to_have_text("7")
    page.mouse.up()


def test_space_clears_the_canvas_and_the_prediction(page: Page) -> None:
    draw(page, place(ONE, (0.5, 0.5), 0.7))
    expect(page.get_by_test_id("prediction")).to_have_text("1")
    page.keyboard.press("Space")
    expect_no_prediction(page)
    assert canvas_is_blank(page)
    assert preview_ink(page) == 0


def test_the_clear_button_clears_the_canvas_and_the_prediction(page: Page) -> None:
    draw(page, place(ZERO, (0.5, 0.5), 0.7))
    expect(page.get_by_test_id("prediction")).to_have_text("0")
    page.get_by_test_id("clear").click()
    expect_no_prediction(page)
    assert canvas_is_blank(page)
    # And from the keyboard: the button is focusable and Enter presses it.
    draw(page, place(ONE, (0.5, 0.5), 0.7))
    expect(page.get_by_test_id("prediction")).to_have_text("1")
    page.get_by_test_id("clear").focus()
    expect(page.get_by_test_id("clear")).to_be_focused()
    page.keyboard.press("Enter")
    expect_no_prediction(page)


def test_ctrl_z_undoes_the_last_stroke(page: Page) -> None:
    draw(page, place(ONE, (0.55, 0.5), 0.7))
    expect(page.get_by_test_id("prediction")).to_have_text("1")
    draw(page, place(SEVEN_BAR, (0.55, 0.5), 0.7))
    expect(page.get_by_test_id("prediction")).to_have_text("7")
    page.keyboard.press("Control+z")
    expect(page.get_by_test_id("prediction")).to_have_text("1")
    page.keyboard.press("Control+z")
    expect_no_prediction(page)
    assert canvas_is_blank(page)


def test_the_model_name_version_and_accuracy_are_shown(page: Page, server: str) -> None:
    info = httpx.get(f"{server}/v1/model", timeout=5).json()
    model_info = page.get_by_test_id("model-info")
    expect(model_info).to_contain_text(info["name"])
    expect(model_info).to_contain_text(f"v{info['version']}")
    expect(model_info).to_contain_text(f"{info['test_accuracy'] * 100:.2f}% test accuracy")


def test_a_server_error_is_shown_with_its_message(page: Page) -> None:
    body = json.dumps({"error": "unavailable", "message": "the model is reloading"})
    page.route(PREDICT_ROUTE, lambda route: route.fulfill(status=503, content_type="application/json", body=body))
    draw(page, place(ONE, (0.5, 0.5), 0.7))
    status = page.get_by_test_id("status")
    expect(status).to_have_attribute("data-state", "error")
    expect(status).to_contain_text("the model is reloading")
    expect_no_prediction(page)
    # Once the server answers again, the error goes away.
    page.unroute(PREDICT_ROUTE)
    draw(page, place(ONE, (0.5, 0.5), 0.7))
    expect(page.get_by_test_id("prediction")).to_have_text("1")
    expect(status).to_have_attribute("data-state", "ok")


def test_an_unreachable_server_is_shown(page: Page) -> None:
    page.route(PREDICT_ROUTE, lambda route: route.abort("connectionrefused"))
    draw(page, place(SEVEN, (0.5, 0.5), 0.7))
    status = page.get_by_test_id("status")
    expect(status).to_have_attribute("data-state", "error")
    expect(status).to_contain_text(re.compile("server unreachable", re.IGNORECASE))
    expect_no_prediction(page)


def test_a_server_that_is_not_ready_is_shown_on_load(browser: Browser, server: str) -> None:
    context = browser.new_context(base_url=server)
    try:
        page = context.new_page()
        body = json.dumps({"status": "not ready", "detail": "model not loaded or batcher not running"})
        page.route("**/readyz", lambda route: route.fulfill(status=503, content_type="application/json", body=body))
        page.goto("/")
        status = page.get_by_test_id("status")
        expect(status).to_have_attribute("data-state", "error")
        expect(status).to_contain_text("not ready")
        # It keeps checking, and says so when the server becomes ready.
        page.unroute("**/readyz")
        expect(status).to_have_attribute("data-state", "ok")
        expect(page.get_by_test_id("model-info")).to_contain_text("test accuracy")
    finally:
        context.close()


def test_the_page_works_under_a_strict_content_security_policy(browser: Browser, server: str) -> None:
    """No inline scripts or styles: the page keeps working with `script-src 'self'` and `style-src 'self'`."""
    csp = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )

    def with_csp(route: Route) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": csp})

    context = browser.new_context(base_url=server)
    try:
        page = context.new_page()
        page.add_init_script(
            "window.cspViolations = [];"
            "document.addEventListener('securitypolicyviolation', e => window.cspViolations.push(e.violatedDirective));"
        )
        page.route(re.compile(r"^http://127\.0\.0\.1:\d+/$"), with_csp)
        response = page.goto("/")
        assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.get_by_test_id("status")).to_have_attribute("data-state", "ok")
        draw(page, place(SEVEN, (0.5, 0.5), 0.7))
        expect(page.get_by_test_id("prediction")).to_have_text("7")
        assert page.get_by_test_id("prob-7").locator(".bar-fill").evaluate("e => e.getBoundingClientRect().width") > 0
        assert page.evaluate("window.cspViolations") == []
    finally:
        context.close()


def test_a_low_confidence_answer_is_shown_as_a_doubt(page: Page) -> None:
    probabilities = [0.01, 0.01, 0.01, 0.01, 0.46, 0.02, 0.01, 0.02, 0.02, 0.43]
    page.route(
        PREDICT_ROUTE,
        lambda route: route.fulfill(status=200, content_type="application/json", body=fake_answer(probabilities)),
    )
    draw(page, place(ONE, (0.5, 0.5), 0.7))
    expect(page.get_by_test_id("prediction")).to_have_text("4")
    expect(page.get_by_test_id("prediction")).to_have_class(re.compile(r"\bunsure\b"))
    expect(page.get_by_test_id("confidence")).to_have_text("not sure: 4 or 9?")
    expect(page.get_by_test_id("prob-4")).to_contain_text("46.0%")


def test_one_request_at_a_time_and_stale_answers_are_dropped(page: Page) -> None:
    held: list[Route] = []
    page.route(PREDICT_ROUTE, lambda route: held.append(route))
    draw(page, place(SEVEN, (0.5, 0.5), 0.7))  # a long stroke: many moves, but only one request may be in flight
    wait_until(page, lambda: len(held) == 1)
    expect(page.get_by_test_id("result")).to_have_attribute("aria-busy", "true")
    page.keyboard.press("Space")  # clear while the answer is on its way
    held[0].fulfill(status=200, content_type="application/json", body=fake_answer([0.0] * 7 + [1.0, 0.0, 0.0]))
    expect_no_prediction(page)  # the answer for the cleared drawing is not shown
    assert len(held) == 1


def test_the_page_fits_a_phone_and_draws_with_touch(browser: Browser, server: str) -> None:
    options = {
        "viewport": {"width": 390, "height": 844},
        "device_scale_factor": 3,
        "is_mobile": True,
        "has_touch": True,
    }
    with open_page(browser, server, **options) as page:
        layout = page.evaluate(
            """() => {
                const canvas = document.querySelector("[data-testid=canvas]");
                const rect = canvas.getBoundingClientRect();
                return {
                    scrollWidth: document.documentElement.scrollWidth,
                    width: window.innerWidth,
                    left: rect.left, right: rect.right, backing: canvas.width,
                };
            }"""
        )
        assert layout["scrollWidth"] <= layout["width"]  # no sideways scrolling
        assert layout["left"] >= 0 and layout["right"] <= layout["width"]
        assert layout["right"] - layout["left"] > 0.75 * layout["width"]  # the canvas takes the width
        assert layout["backing"] == round((layout["right"] - layout["left"]) * 3)

        # Draw a 1 bottom to top with a finger: touch events become pointer events, and the page must not scroll.
        cdp = page.context.new_cdp_session(page)
        box = canvas_box(page)
        stroke = [to_screen(box, point) for point in place(ONE, (0.5, 0.5), 0.7)[0]][::-1]
        cdp.send(
            "Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": stroke[0][0], "y": stroke[0][1]}]}
        )
        for x, y in stroke[1:]:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        expect(page.get_by_test_id("prediction")).to_have_text("1")
        assert page.evaluate("window.scrollY") == 0


def test_screenshot_for_the_readme(browser: Browser, server: str) -> None:
    """Draws a digit and saves docs/screenshot.png, the picture the README shows."""
    with open_page(browser, server, viewport={"width": 1000, "height": 760}, device_scale_factor=1) as page:
        draw(page, place(SEVEN, (0.5, 0.5), 0.68))
        expect(page.get_by_test_id("prediction")).to_have_text("7")
        expect(page.get_by_test_id("result")).to_have_attribute("aria-busy", "false")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=SCREENSHOT, full_page=True, animations="disabled", caret="hide")
