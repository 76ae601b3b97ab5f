"""Open a report page in a real headless Chromium (Debian's ``chromium``, driven by Playwright)
and check what a person would see: every figure drawn with a size, no console error, no request
leaving the file, no sideways scrolling on a laptop screen; and save a screenshot.

Skipped with a reason when Chromium or Playwright is missing, unless ``REQUIRE_BROWSER=1`` (CI),
which makes that a failure.  ``CHROMIUM`` names the browser binary (default: ``chromium`` on the
PATH, then the usual other names).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

LAPTOP = {"width": 1366, "height": 768}
BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Run in the page: each figure's size and how much it drew; the tables; the page's width.
MEASURE = """() => ({
  figures: [...document.querySelectorAll('figure.chart')].map(f => {
    const svg = f.querySelector('svg'); const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return {name: f.dataset.figure, width: box.width, height: box.height,
            shapes: svg ? svg.querySelectorAll('path, rect, use, text, image').length : 0,
            visible: !!svg && getComputedStyle(svg).visibility !== 'hidden' && getComputedStyle(svg).display !== 'none'};
  }),
  tables: [...document.querySelectorAll('[data-table]')].map(t => [t.dataset.table, t.getBoundingClientRect().height]),
  svgs: document.querySelectorAll('svg').length,
  scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth,
})"""


def _unavailable(reason: str) -> None:
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"{reason} (apt-get install chromium; pip install playwright)")


def chromium_binary() -> str | None:
    """The Chromium to drive: ``$CHROMIUM``, else the first of :data:`BINARIES` on the PATH."""
    named = os.environ.get("CHROMIUM")
    if named:
        return named if Path(named).exists() else shutil.which(named)
    return next((found for name in BINARIES if (found := shutil.which(name))), None)


def open_in_browser(page_path: Path, screenshot: Path) -> dict[str, Any]:
    """Load ``page_path`` at a laptop's screen size, assert it rendered cleanly (see the module
    docstring), save a full-page screenshot to ``screenshot``; returns the measurements."""
    binary = chromium_binary()
    if binary is None:
        _unavailable("no Chromium found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    problems: list[str] = []
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=LAPTOP)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

            def route(r: Any) -> None:
                if r.request.url.startswith("file://"):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            measured = page.evaluate(MEASURE)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    assert not outside, f"the page asked for {outside}"
    assert measured["figures"], "no figure on the page"
    for fig in measured["figures"]:
        assert fig["visible"] and fig["width"] > 100 and fig["height"] > 30 and fig["shapes"] > 0, fig
    assert all(height > 0 for _, height in measured["tables"]), measured["tables"]
    assert measured["scrollWidth"] <= measured["innerWidth"], "the page scrolls sideways on a laptop screen"
    assert screenshot.stat().st_size > 10_000
    return measured
