"""Headless Chromium for tests that look at a page as a person would.

Debian's ``chromium`` and ``chromium-driver`` packages, driven by selenium 4
through an explicit driver path: nothing here downloads a browser or a
driver (selenium's own manager would try). A test calls :func:`require` (or
:func:`open_page`, which calls it): where the browser, its driver or
selenium is missing, the test is skipped and the reason says what to install.

:func:`open_page` loads one URL, waits until the page shows a given text (or
a CSS selector matches), and returns what a person and a test would check:
a screenshot (PNG bytes), the console's errors and the page's visible text.
:func:`browser` is the driver itself, for a test that clicks around.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
INSTALL = "apt-get install -y chromium chromium-driver; pip install -e '.[dev]' (selenium)"


@dataclass
class Page:
    """One loaded page, as it looked when the wait ended."""

    url: str
    """Where the browser ended up (after redirects and client-side routing)."""
    png: bytes
    """Screenshot of the window."""
    text: str
    """The visible text of the page (``document.body.innerText``)."""
    console_errors: list[str] = field(default_factory=list)
    """The browser console's SEVERE entries (failed loads, uncaught exceptions)."""


def _first_on_path(names: tuple[str, ...], env: str) -> str | None:
    given = os.environ.get(env)
    if given:
        return given if Path(given).is_file() else None
    return next((p for p in map(shutil.which, names) if p), None)


def find() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why they cannot be used.

    ``GEMINI_CHROMIUM`` and ``GEMINI_CHROMEDRIVER`` name other binaries.
    """
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"selenium is not installed ({INSTALL})"
    chromium = _first_on_path(CHROMIUM_NAMES, "GEMINI_CHROMIUM")
    driver = _first_on_path(DRIVER_NAMES, "GEMINI_CHROMEDRIVER")
    if chromium is None:
        return f"no Chromium on PATH ({INSTALL})"
    if driver is None:
        return f"no chromedriver on PATH ({INSTALL})"
    return chromium, driver


def require() -> tuple[str, str]:
    """(chromium, chromedriver), or skip the calling test with the reason."""
    found = find()
    if isinstance(found, str):
        pytest.skip(found)
    return found


@contextmanager
def browser(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium session (a selenium WebDriver), quit on exit."""
    chromium, driver_path = require()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        # Tests run as root here, where Chromium's sandbox refuses to start.
        "--no-sandbox",
        # /dev/shm is small in containers; Chromium then crashes on big pages.
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    """The SEVERE console entries logged since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def wait_until(
    driver: Any, done: Callable[[Any], bool], timeout_s: float, what: str, poll_s: float = 0.25
) -> None:
    """Poll ``done(driver)`` until it holds; fail the test with the page's text if it never does."""
    deadline = time.monotonic() + timeout_s
    while not done(driver):
        if time.monotonic() > deadline:
            text = page_text(driver)
            pytest.fail(
                f"{what}: not seen within {timeout_s:.0f} s at {driver.current_url}\n"
                f"page text:\n{text[:3000]}"
            )
        time.sleep(poll_s)


def page_text(driver: Any) -> str:
    try:
        return str(driver.execute_script("return document.body ? document.body.innerText : ''"))
    except Exception:  # a page mid-navigation has no body to read
        return ""


def open_page(
    url: str,
    *,
    text: str | None = None,
    css: str | None = None,
    timeout_s: float = 60.0,
    width: int = 1600,
    height: int = 1000,
) -> Page:
    """Load ``url`` and wait until its visible text contains ``text`` and/or an element
    matches ``css`` (neither: until the document is loaded)."""
    from selenium.webdriver.common.by import By

    with browser(width, height) as driver:
        driver.get(url)

        def ready(d: Any) -> bool:
            if d.execute_script("return document.readyState") != "complete":
                return False
            if text is not None and text not in page_text(d):
                return False
            return css is None or bool(d.find_elements(By.CSS_SELECTOR, css))

        wait_until(driver, ready, timeout_s, f"text {text!r} / selector {css!r}")
        return Page(
            url=driver.current_url,
            png=driver.get_screenshot_as_png(),
            text=page_text(driver),
            console_errors=console_errors(driver),
        )
