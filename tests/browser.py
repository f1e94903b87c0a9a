"""Headless Chromium for the browser tests, and where their screenshots go.

The browser is Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it)
driven by Playwright's Python package with ``executable_path``: Playwright's own browser
downloads are never used. Without either, :func:`browser_or_skip` skips with one line
saying what is missing.

Screenshots land in ``runs/screenshots/`` (``$ASSIST_SCREENSHOTS`` overrides), at 1280 px
and 400 px wide, for a person to look at. The README's copies in ``docs/img/`` are written
when they are missing or ``ASSIST_DOCS_IMAGES=1`` is set (then commit them), so an ordinary
test run leaves the checkout clean.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTHS = (1280, 400)
DOCS_HEIGHT = 1600  # the README's copy: the top of the page at 1280 px, no taller than this


def chromium_path() -> str | None:
    """The system Chromium (``$ASSIST_CHROMIUM`` first), or None."""
    for path in (os.environ.get("ASSIST_CHROMIUM"), *CHROMIUM, shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    return None


@contextmanager
def browser_or_skip() -> Iterator[Any]:
    """A launched headless Chromium; the test skips (one line) when there is none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need the playwright package (pip install 'assist[dev]')")
    path = chromium_path()
    if path is None:
        pytest.skip("browser tests need Chromium at /usr/bin/chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshots_dir() -> Path:
    out = Path(os.environ.get("ASSIST_SCREENSHOTS") or REPO / "runs" / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def screenshot(page: Any, name: str) -> list[Path]:
    """``NAME-1280.png`` and ``NAME-400.png`` of the whole page as it is; the top of the
    1280 px one also as ``docs/img/NAME.png`` when that is missing or ``ASSIST_DOCS_IMAGES=1``."""
    size = page.viewport_size
    page.mouse.move(0, 0)  # no hover highlight left where the last click was
    paths = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": size["height"] if size else 900})
        path = screenshots_dir() / f"{name}-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        paths.append(path)
    page.set_viewport_size({"width": WIDTHS[0], "height": DOCS_HEIGHT})
    docs = REPO / "docs" / "img" / f"{name}.png"
    if not docs.exists() or os.environ.get("ASSIST_DOCS_IMAGES") == "1":
        docs.parent.mkdir(parents=True, exist_ok=True)
        bottom = page.evaluate("document.querySelector('main').getBoundingClientRect().bottom")
        height = min(DOCS_HEIGHT, int(bottom) + 8)  # the content, not the empty window below it
        page.screenshot(path=str(docs), full_page=True, clip={"x": 0, "y": 0, "width": WIDTHS[0], "height": height})
    if size:
        page.set_viewport_size(size)
    return paths


def watch_errors(page: Any) -> list[str]:
    """Collects the page's script errors and failed loads: a test asserts the list is empty."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    return errors
